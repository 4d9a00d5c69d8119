//! Routes for admins only: the dead letters, and suspending accounts.
//!
//! Any other caller gets 403 `admin_only` (401 without a session). Reprocessing any track is
//! `POST /v1/tracks/{id}/reprocess`, which admins may call on every track.

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use waveline_shared::domain::UserId;

use crate::AppState;
use crate::auth::{Auth, Session, UserView};
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Operators: dead letters and account suspension (admins only).
    Admin,
}

/// The admin routes.
#[derive(Debug)]
pub struct Admin {
    pub state: AppState,
}

/// A job that will not be retried again.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct DeadLetterView {
    /// Names it for a replay.
    id: String,
    /// Stable code: `retries_exhausted`, `unreadable_payload`, …
    code: String,
    reason: String,
    /// The job's kind (`process_track`, `push`), when the payload could be read.
    kind: Option<String>,
    /// The job's track, when the payload could be read and the job is about a track.
    track_id: Option<String>,
    dead_at: DateTime<Utc>,
}

#[derive(Debug, Object)]
struct DeadLetters {
    dead_letters: Vec<DeadLetterView>,
}

fn admin_only(session: &Session) -> Result<(), ApiError> {
    if session.is_admin() {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "admin_only", "only admins may do this"))
    }
}

fn parse_user_id(text: &str) -> Result<UserId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found("user"))
}

#[OpenApi(tag = "Tag::Admin")]
impl Admin {
    /// The oldest dead letters (jobs that will not be retried), up to `limit` (1–500, default
    /// 100). Replay them with `waveline jobs replay`.
    #[oai(path = "/v1/admin/dead-letters", method = "get")]
    async fn dead_letters(
        &self,
        auth: Auth,
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))] limit: Query<Option<u32>>,
    ) -> Result<Json<DeadLetters>, ApiError> {
        admin_only(auth.session())?;
        let letters = self
            .state
            .queue
            .dead_letters(limit.0.unwrap_or(100) as usize)
            .await
            .map_err(|err| ApiError::unavailable("queue", &err))?;
        Ok(Json(DeadLetters {
            dead_letters: letters
                .into_iter()
                .map(|letter| DeadLetterView {
                    id: letter.id.to_string(),
                    code: letter.code,
                    reason: letter.reason,
                    kind: letter.job.as_ref().map(|message| message.job.kind().to_owned()),
                    track_id: letter.job.and_then(|message| message.job.track_id()).map(|id| id.to_string()),
                    dead_at: letter.dead_at,
                })
                .collect(),
        }))
    }

    /// Suspends an account: it cannot log in, its sessions end at once, and its private
    /// tracks can no longer be played by anyone but admins.
    #[oai(path = "/v1/admin/users/:id/suspension", method = "put")]
    async fn suspend(&self, id: Path<String>, auth: Auth) -> Result<Json<UserView>, ApiError> {
        self.set_suspended(&id.0, auth.session(), true).await
    }

    /// Lifts a suspension (the account logs in again; its old sessions stay ended).
    #[oai(path = "/v1/admin/users/:id/suspension", method = "delete")]
    async fn unsuspend(&self, id: Path<String>, auth: Auth) -> Result<Json<UserView>, ApiError> {
        self.set_suspended(&id.0, auth.session(), false).await
    }
}

impl Admin {
    async fn set_suspended(&self, id: &str, session: &Session, suspended: bool) -> Result<Json<UserView>, ApiError> {
        admin_only(session)?;
        let id = parse_user_id(id)?;
        if id == session.user.id {
            return Err(ApiError::conflict("own_account", "admins cannot suspend themselves"));
        }
        if !self.state.users.set_suspended(id, suspended).await? {
            return Err(ApiError::not_found("user"));
        }
        // This process forgets the account's sessions at once; the others when the
        // notification reaches them.
        self.state.status_feed.sessions().forget_user(id);
        let user = self.state.users.by_id(id).await?.ok_or_else(|| ApiError::not_found("user"))?;
        tracing::info!(admin = %session.user.id, user = %id, suspended, "suspension changed");
        Ok(Json(UserView::from(&user).with_subscription(&self.state, user.id).await?))
    }
}
