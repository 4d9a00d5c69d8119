//! Timestamped comments (documents): written at a point of a track, drawn along its waveform.
//!
//! - Comments are for ready tracks the caller can see; `timestamp_ms` lies within the track
//!   (0 to `duration_ms`), otherwise 400 `invalid_field` naming it. A body is 1–1000
//!   characters (trimmed; no control characters but tab and newline).
//! - Replies are one level deep: a reply to a reply attaches to its root.
//! - An account the track's owner blocks cannot comment on their tracks (403 `blocked`).
//! - The list takes a time window (`from_ms`, `to_ms`), what a player asks for to draw the
//!   comments of the part of the waveform on screen, in track order or newest first.
//! - A comment is deleted by its author, the track's owner or an admin; its replies go with it.

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use waveline_shared::bus::Event;
use waveline_shared::db::TrackDetails;
use waveline_shared::documents::{Comment, CommentOrder, CommentQuery, NewComment, NotificationKind, Subject};
use waveline_shared::domain::CommentId;

use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::ApiError;
use crate::social::{Done, UserSummaryView};
use crate::tracks::check_text;
use crate::{AppState, may_see, parse_track_id};

#[derive(Tags)]
enum Tag {
    /// Timestamped comments on tracks.
    Comments,
}

/// The comment routes.
#[derive(Debug)]
pub struct Comments {
    pub state: AppState,
}

/// A comment.
#[derive(Debug, Object)]
struct CommentView {
    id: String,
    user: UserSummaryView,
    body: String,
    /// Where in the track, in milliseconds from the start.
    timestamp_ms: i64,
    /// The root comment this one replies to.
    reply_to: Option<String>,
    created_at: DateTime<Utc>,
}

/// A new comment.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct CommentCreate {
    /// 1–1000 characters.
    body: String,
    /// Where in the track: 0 to its `duration_ms`.
    timestamp_ms: i64,
    /// A comment of the same track to reply to (a reply to a reply attaches to its root).
    reply_to: Option<String>,
}

/// A page of comments.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct CommentPage {
    comments: Vec<CommentView>,
    /// Pass as `cursor` for the next page of the same query; absent on the last page.
    next_cursor: Option<String>,
}

/// The order of a comment list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
enum Order {
    /// Along the track (`timestamp_ms` ascending).
    Timestamp,
    /// Newest first.
    Newest,
}

#[derive(ApiResponse)]
enum Created {
    /// The comment.
    #[oai(status = 201)]
    Created(Json<CommentView>),
}

impl Comments {
    /// The track if the caller may see it (404 otherwise) and it is ready (409 `not_ready`).
    async fn ready_track(&self, id: &str, session: Option<&Session>) -> Result<TrackDetails, ApiError> {
        let id = parse_track_id(id)?;
        let track = self.state.tracks.details(id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        if !may_see(track.owner_id, track.visibility, session) {
            return Err(ApiError::not_found("track"));
        }
        if track.ready_revision.is_none() {
            return Err(ApiError::conflict(
                "not_ready",
                format!("the track is {}; comments open once it is ready", track.state),
            ));
        }
        Ok(track)
    }

    /// Tells who should hear of a new comment: the sockets watching the track (the comment
    /// and the new count), the author of the comment it replies to, and the track's owner.
    async fn announce(&self, track: &TrackDetails, comment: &Comment, author: waveline_shared::domain::UserId) {
        if let Err(err) = self.state.realtime.bus.publish(&Event::CommentNew { comment: comment.clone() }).await {
            tracing::warn!(error = %err, "could not publish a new comment");
        }
        crate::realtime::publish_counters(&self.state, track.id);
        if let Err(err) = self.state.plays.db().comment_made(track.id, comment.created_at).await {
            tracing::warn!(error = %err, "cannot count a comment in its hour for the charts");
        }
        let subject = Subject::Comment { track: track.id, comment: comment.id };
        let mut replied_to = None;
        if let Some(root) = comment.reply_to {
            match self.state.documents.comment(root).await {
                Ok(Some(root)) if root.user_id != author => {
                    replied_to = Some(root.user_id);
                    crate::inbox::notify(&self.state, root.user_id, NotificationKind::Reply, Some(author), subject)
                        .await;
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "could not find the comment replied to"),
            }
        }
        if track.owner_id != author && replied_to != Some(track.owner_id) {
            crate::inbox::notify(&self.state, track.owner_id, NotificationKind::Comment, Some(author), subject).await;
        }
    }

    /// Views of comments; those whose author is gone drop out.
    async fn views(&self, comments: Vec<Comment>) -> Result<Vec<CommentView>, ApiError> {
        let mut authors: Vec<_> = comments.iter().map(|c| c.user_id).collect();
        authors.sort_unstable();
        authors.dedup();
        let users = self.state.social.summaries(&authors).await?;
        Ok(comments
            .into_iter()
            .filter_map(|c| {
                let user = users.get(&c.user_id)?;
                Some(CommentView {
                    id: c.id.to_string(),
                    user: UserSummaryView::from(user),
                    body: c.body,
                    timestamp_ms: c.timestamp_ms,
                    reply_to: c.reply_to.map(|id| id.to_string()),
                    created_at: c.created_at,
                })
            })
            .collect())
    }
}

#[OpenApi(tag = "Tag::Comments")]
impl Comments {
    /// Comments at a point of a ready track you can see.
    #[oai(path = "/v1/tracks/:id/comments", method = "post")]
    async fn create(&self, id: Path<String>, body: Json<CommentCreate>, auth: Auth) -> Result<Created, ApiError> {
        let session = auth.session();
        self.state.social_writes.check(session.user.id)?;
        let track = self.ready_track(&id.0, Some(session)).await?;
        if track.owner_id != session.user.id && self.state.social.blocks(track.owner_id, session.user.id).await? {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "blocked", "the track's owner blocks you"));
        }
        let body = body.0;
        let text = check_text("body", &body.body, 1, waveline_shared::documents::COMMENT_BODY_MAX_CHARS)?;
        let duration = track.duration_ms.unwrap_or(0);
        if !(0..=duration).contains(&body.timestamp_ms) {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("timestamp_ms: must lie within the track, 0 to {duration}, got {}", body.timestamp_ms),
            ));
        }
        let reply_to = body
            .reply_to
            .as_deref()
            .map(|text| text.parse::<CommentId>())
            .transpose()
            .map_err(|_| ApiError::bad_request("invalid_field", "reply_to: not a comment id"))?;
        let comment = self
            .state
            .documents
            .insert_comment(NewComment {
                track_id: track.id,
                user_id: session.user.id,
                body: text,
                timestamp_ms: body.timestamp_ms,
                reply_to,
                created_at: Utc::now(),
            })
            .await?;
        self.announce(&track, &comment, session.user.id).await;
        let view = self.views(vec![comment]).await?.pop().ok_or_else(|| ApiError::not_found("user"))?;
        Ok(Created::Created(Json(view)))
    }

    /// A track's comments: along the track (`order=timestamp`, the default) or newest first,
    /// optionally within a time window.
    #[oai(path = "/v1/tracks/:id/comments", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        id: Path<String>,
        /// Only comments at or after this point (ms).
        #[oai(validator(minimum(value = "0")))]
        from_ms: Query<Option<i64>>,
        /// Only comments at or before this point (ms).
        #[oai(validator(minimum(value = "0")))]
        to_ms: Query<Option<i64>>,
        /// `timestamp` (default) or `newest`.
        order: Query<Option<Order>>,
        /// From `next_cursor` of the previous page of the same query.
        #[oai(validator(max_length = 80))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<CommentPage>, ApiError> {
        let track = self.ready_track(&id.0, auth.session()).await?;
        if let (Some(from), Some(to)) = (from_ms.0, to_ms.0)
            && from > to
        {
            return Err(ApiError::bad_request("invalid_field", format!("from_ms: {from} is after to_ms {to}")));
        }
        let limit = crate::social::page_limit(limit.0)?;
        let page = self
            .state
            .documents
            .comments(&CommentQuery {
                track_id: track.id,
                order: match order.0.unwrap_or(Order::Timestamp) {
                    Order::Timestamp => CommentOrder::Timestamp,
                    Order::Newest => CommentOrder::Newest,
                },
                from_ms: from_ms.0,
                to_ms: to_ms.0,
                cursor: cursor.0,
                limit: limit as usize,
            })
            .await?;
        Ok(Json(CommentPage { comments: self.views(page.comments).await?, next_cursor: page.next_cursor }))
    }

    /// Deletes a comment and its replies: by its author, the track's owner or an admin.
    #[oai(path = "/v1/comments/:id", method = "delete")]
    async fn delete(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let session = auth.session();
        let id: CommentId = id.0.parse().map_err(|_| ApiError::not_found("comment"))?;
        let comment = self.state.documents.comment(id).await?.ok_or_else(|| ApiError::not_found("comment"))?;
        let track = self.state.tracks.details(comment.track_id).await?.ok_or_else(|| ApiError::not_found("comment"))?;
        if !may_see(track.owner_id, track.visibility, Some(session)) {
            return Err(ApiError::not_found("comment"));
        }
        let me = session.user.id;
        if comment.user_id != me && track.owner_id != me && !session.is_admin() {
            return Err(ApiError::forbidden("only the comment's author, the track's owner or an admin may delete it"));
        }
        let removed = self.state.documents.delete_comment(id).await?;
        // The thread goes from the hour of its first comment (the statistics' approximation).
        if let Err(err) = self.state.plays.db().comments_deleted(track.id, comment.created_at, removed).await {
            tracing::warn!(error = %err, "cannot take a deleted comment from its hour for the charts");
        }
        crate::realtime::publish_counters(&self.state, track.id);
        Ok(Done::Done)
    }
}
