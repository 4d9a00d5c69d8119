//! Push devices (migration `…_devices.sql`): the FCM registration tokens each account
//! registered, which the push job sends to.
//!
//! - **A token belongs to one account.** It names one app install; when that install signs in
//!   to another account and registers again, the row moves there, so a push for the first
//!   account never reaches the second one's device.
//! - **At most [`MAX_DEVICES_PER_ACCOUNT`] per account.** Registering one more drops the
//!   least recently registered. An account's registrations are serialised by a lock on its row
//!   (`FOR NO KEY UPDATE`, which does not stop others' rows from referencing it), so the
//!   limit holds exactly whatever runs at once.
//! - **Only one's own.** Unregistering names the account too: a token of someone else's is
//!   left alone, and the caller cannot tell it apart from an unknown one.

use sqlx::postgres::PgPool;

use super::DbError;
use crate::domain::UserId;
use crate::push::{DeviceToken, MAX_DEVICES_PER_ACCOUNT, Platform};

/// The devices in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgDevices {
    pool: PgPool,
}

impl PgDevices {
    pub fn new(pool: PgPool) -> PgDevices {
        PgDevices { pool }
    }

    /// Registers `token` for `user` (again: its registration time moves to now), taking it
    /// from whichever account had it, and drops the account's least recently registered
    /// devices beyond the limit. `false` when the account does not exist (any more).
    pub async fn register(&self, user: UserId, token: &DeviceToken, platform: Platform) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let account: Option<(UserId,)> = sqlx::query_as("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
        if account.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO devices (token, user_id, platform) VALUES ($1, $2, $3)
             ON CONFLICT (token) DO UPDATE SET user_id = EXCLUDED.user_id, platform = EXCLUDED.platform,
                 updated_at = clock_timestamp()",
        )
        .bind(token)
        .bind(user)
        .bind(platform.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM devices WHERE user_id = $1 AND token NOT IN (
                 SELECT token FROM devices WHERE user_id = $1 ORDER BY updated_at DESC, token LIMIT $2)",
        )
        .bind(user)
        .bind(MAX_DEVICES_PER_ACCOUNT as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Unregisters `token` if `user` has it; returns whether it did.
    pub async fn unregister(&self, user: UserId, token: &DeviceToken) -> Result<bool, DbError> {
        let deleted = sqlx::query("DELETE FROM devices WHERE token = $1 AND user_id = $2")
            .bind(token)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() == 1)
    }

    /// The account's device tokens, most recently registered first.
    pub async fn tokens(&self, user: UserId) -> Result<Vec<DeviceToken>, DbError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT token FROM devices WHERE user_id = $1 ORDER BY updated_at DESC, token LIMIT $2")
                .bind(user)
                .bind(MAX_DEVICES_PER_ACCOUNT as i64)
                .fetch_all(&self.pool)
                .await?;
        // A row the API did not write could hold anything: such a token is skipped, not sent.
        Ok(rows.into_iter().filter_map(|(token,)| DeviceToken::parse(&token).ok()).collect())
    }

    /// Removes a token whoever has it (FCM said it is no longer valid); returns whether it was
    /// there.
    pub async fn delete(&self, token: &DeviceToken) -> Result<bool, DbError> {
        let deleted = sqlx::query("DELETE FROM devices WHERE token = $1").bind(token).execute(&self.pool).await?;
        Ok(deleted.rows_affected() == 1)
    }
}
