//! User accounts and revoked session tokens.
//!
//! Passwords arrive here already hashed (argon2id PHC strings, made by the API); this layer
//! never sees a password.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use super::DbError;
use crate::domain::UserId;

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Admin,
    /// The owner of operator imports; it cannot log in.
    System,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::System => "system",
        }
    }

    fn parse(text: &str) -> Result<Role, DbError> {
        match text {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            "system" => Ok(Role::System),
            other => Err(DbError::Invalid(format!("unknown role {other:?}"))),
        }
    }
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: UserId,
    pub email: String,
    pub username: String,
    pub role: Role,
    /// The argon2id PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A new account, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub email: &'a str,
    pub username: &'a str,
    pub password_hash: &'a str,
}

/// Accounts in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgUsers {
    pool: PgPool,
}

type UserTuple = (UserId, String, String, String, Option<String>, DateTime<Utc>);

fn user_row((id, email, username, role, password_hash, created_at): UserTuple) -> Result<UserRow, DbError> {
    Ok(UserRow { id, email, username, role: Role::parse(&role)?, password_hash, created_at })
}

const USER_COLUMNS: &str = "id, email, username, role, password_hash, created_at";

impl PgUsers {
    pub fn new(pool: PgPool) -> PgUsers {
        PgUsers { pool }
    }

    /// Creates an account with the `user` role. A taken email (compared without case) or
    /// username is [`DbError::Conflict`] naming which.
    pub async fn create(&self, new: &NewUser<'_>) -> Result<UserRow, DbError> {
        let id = UserId::new();
        let inserted = sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4) RETURNING {USER_COLUMNS}"
        )))
        .bind(id)
        .bind(new.email)
        .bind(new.username)
        .bind(new.password_hash)
        .fetch_one(&self.pool)
        .await;
        match inserted {
            Ok(row) => user_row(row),
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("23505") => {
                let what = match err.constraint() {
                    Some("users_username_key") => "username",
                    _ => "email",
                };
                Err(DbError::Conflict(format!("an account with this {what} already exists")))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The account with this email, compared without case.
    pub async fn by_email(&self, email: &str) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE lower(email) = lower($1)"
        )))
        .bind(email)
        .fetch_optional(&self.pool)
        .await?
        .map(user_row)
        .transpose()
    }

    /// The account with this id.
    pub async fn by_id(&self, id: UserId) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(user_row)
            .transpose()
    }

    /// The account with this username.
    pub async fn by_username(&self, username: &str) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = $1"
        )))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?
        .map(user_row)
        .transpose()
    }

    /// Makes an account an admin (an operator's act: `waveline users promote`).
    pub async fn set_role(&self, id: UserId, role: Role) -> Result<bool, DbError> {
        Ok(sqlx::query("UPDATE users SET role = $2 WHERE id = $1 AND role <> 'system'")
            .bind(id)
            .bind(role.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    /// Records a session token as revoked until it would have expired anyway; also clears
    /// out revocations whose tokens have expired since.
    pub async fn revoke_token(&self, jti: uuid::Uuid, user: UserId, expires_at: DateTime<Utc>) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < now()").execute(&mut *tx).await?;
        sqlx::query("INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(jti)
            .bind(user)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The account behind a session token, if the token is not revoked and the account
    /// still exists: one query per authenticated request.
    pub async fn session_user(&self, jti: uuid::Uuid, id: UserId) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $2)"
        )))
        .bind(id)
        .bind(jti)
        .fetch_optional(&self.pool)
        .await?
        .map(user_row)
        .transpose()
    }
}
