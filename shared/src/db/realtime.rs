//! What the sockets need from the database (migration `…_realtime.sql`): single-use tickets,
//! and which accounts have a live socket on some API process.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::DbError;
use crate::domain::UserId;

/// How long a process's presence rows stay believed without a refresh.
pub const PRESENCE_STALE_S: i64 = 90;
/// The most unused tickets an account may hold at once.
pub const MAX_TICKETS: i64 = 20;

/// Tickets and presence in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgRealtime {
    pool: PgPool,
}

impl PgRealtime {
    pub fn new(pool: PgPool) -> PgRealtime {
        PgRealtime { pool }
    }

    /// Stores a ticket's hash for `user`'s `session` until `expires_at`; `false` when the
    /// account holds [`MAX_TICKETS`] unused ones already.
    pub async fn create_ticket(
        &self,
        hash: &[u8],
        user: UserId,
        session: Uuid,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "INSERT INTO ws_tickets (hash, user_id, session_id, expires_at)
             SELECT $1, $2, $3, $4
             WHERE (SELECT count(*) FROM ws_tickets WHERE user_id = $2 AND expires_at > now()) < $5",
        )
        .bind(hash)
        .bind(user)
        .bind(session)
        .bind(expires_at)
        .bind(MAX_TICKETS)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Uses a ticket (once): its account and session, unless unknown, used or expired.
    pub async fn take_ticket(&self, hash: &[u8]) -> Result<Option<(UserId, Uuid)>, DbError> {
        Ok(sqlx::query_as(
            "DELETE FROM ws_tickets WHERE hash = $1 AND expires_at > now() RETURNING user_id, session_id",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// One more live socket of `user` on process `replica`.
    pub async fn connected(&self, replica: Uuid, user: UserId) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO ws_presence (replica, user_id, connections) VALUES ($1, $2, 1)
             ON CONFLICT (replica, user_id)
             DO UPDATE SET connections = ws_presence.connections + 1, seen_at = now()",
        )
        .bind(replica)
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One socket fewer.
    pub async fn disconnected(&self, replica: Uuid, user: UserId) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE ws_presence SET connections = connections - 1
             WHERE replica = $1 AND user_id = $2 AND connections > 1",
        )
        .bind(replica)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM ws_presence WHERE replica = $1 AND user_id = $2 AND connections = 1")
            .bind(replica)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps process `replica`'s rows believed, and removes other processes' stale rows and
    /// expired tickets.
    pub async fn refresh(&self, replica: Uuid) -> Result<(), DbError> {
        sqlx::query("UPDATE ws_presence SET seen_at = now() WHERE replica = $1")
            .bind(replica)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM ws_presence WHERE seen_at < now() - make_interval(secs => $1)")
            .bind(PRESENCE_STALE_S as f64)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM ws_tickets WHERE expires_at < now()").execute(&self.pool).await?;
        Ok(())
    }

    /// Forgets process `replica` (it is stopping).
    pub async fn leave(&self, replica: Uuid) -> Result<(), DbError> {
        sqlx::query("DELETE FROM ws_presence WHERE replica = $1").bind(replica).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether `user` has a live socket on any process.
    pub async fn online(&self, user: UserId) -> Result<bool, DbError> {
        let (online,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM ws_presence
                            WHERE user_id = $1 AND seen_at > now() - make_interval(secs => $2))",
        )
        .bind(user)
        .bind(PRESENCE_STALE_S as f64)
        .fetch_one(&self.pool)
        .await?;
        Ok(online)
    }
}
