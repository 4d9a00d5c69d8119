//! User accounts, their sessions (refresh-token families), failed-login throttling, and the
//! single-use tokens sent by mail (email verification, password reset).
//!
//! Passwords arrive here already hashed (argon2id PHC strings, made by the API), and mailed
//! tokens as their SHA-256; this layer never sees a password or a token.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use super::DbError;
use super::billing::Tier;
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
    /// When an admin suspended the account: it cannot log in, and its sessions have ended.
    pub suspended_at: Option<DateTime<Utc>>,
    /// Whether the account proved it receives mail at `email` (a verification link, a
    /// completed password reset, or a login provider that vouched for the address).
    pub email_verified: bool,
    /// Free or premium (see [`super::billing`]).
    pub tier: Tier,
}

/// A new account, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub email: &'a str,
    pub username: &'a str,
    pub password_hash: &'a str,
}

/// What came of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Created(UserRow),
    /// An account has this email already; nothing was written.
    EmailTaken,
    /// An account has this username already; nothing was written.
    UsernameTaken,
}

/// Accounts in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgUsers {
    pool: PgPool,
}

type UserTuple = (UserId, String, String, String, Option<String>, DateTime<Utc>, Option<DateTime<Utc>>, bool, String);

fn user_row(
    (id, email, username, role, password_hash, created_at, suspended_at, email_verified, tier): UserTuple,
) -> Result<UserRow, DbError> {
    Ok(UserRow {
        id,
        email,
        username,
        role: Role::parse(&role)?,
        password_hash,
        created_at,
        suspended_at,
        email_verified,
        tier: Tier::parse(&tier)?,
    })
}

const USER_COLUMNS: &str =
    "id, email, username, role, password_hash, created_at, suspended_at, email_verified_at IS NOT NULL, tier";

impl PgUsers {
    pub fn new(pool: PgPool) -> PgUsers {
        PgUsers { pool }
    }

    /// Creates an account with the `user` role, unless its email (compared without case) or
    /// username is taken: then nothing is written, and the answer says which.
    pub async fn register(&self, new: &NewUser<'_>) -> Result<Registration, DbError> {
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
            Ok(row) => Ok(Registration::Created(user_row(row)?)),
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("23505") => Ok(match err.constraint() {
                Some("users_username_key") => Registration::UsernameTaken,
                _ => Registration::EmailTaken,
            }),
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

    /// Starts a session for `user` with its first refresh token (stored by hash). Also
    /// forgets the account's sessions idle longer than `idle_ttl`.
    pub async fn start_session(
        &self,
        user: UserId,
        session: uuid::Uuid,
        refresh_hash: &[u8],
        refresh_expires_at: DateTime<Utc>,
        idle_ttl: std::time::Duration,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND refreshed_at < now() - make_interval(secs => $2)")
            .bind(user)
            .bind(idle_ttl.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO sessions (id, user_id) VALUES ($1, $2)")
            .bind(session)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        insert_refresh(&mut tx, refresh_hash, session, refresh_expires_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Uses a refresh token: replaces it with `next_hash` in the same session, or says why
    /// not. A token used before ends its whole session ([`Rotation::Reused`]), and so does a
    /// session older than `max_age` ([`Rotation::TooOld`]), however fresh its token: a family
    /// has an absolute lifetime. The next token expires at `next_expires_at` or when the family
    /// reaches `max_age`, whichever comes first.
    pub async fn rotate_refresh(
        &self,
        hash: &[u8],
        next_hash: &[u8],
        next_expires_at: DateTime<Utc>,
        max_age: std::time::Duration,
    ) -> Result<Rotation, DbError> {
        let mut tx = self.pool.begin().await?;
        type Found = (uuid::Uuid, bool, Option<DateTime<Utc>>, Option<DateTime<Utc>>, UserId, DateTime<Utc>, bool);
        let found = sqlx::query_as::<_, Found>(
            "SELECT t.session_id, t.expires_at <= now(), t.used_at, s.ended_at, s.user_id,
                    s.created_at + make_interval(secs => $2), s.created_at + make_interval(secs => $2) <= now()
             FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
             WHERE t.token_hash = $1 FOR UPDATE OF t, s",
        )
        .bind(hash)
        .bind(max_age.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((session, expired, used_at, ended_at, user, family_ends_at, too_old)) = found else {
            return Ok(Rotation::Unknown);
        };
        if ended_at.is_some() {
            return Ok(Rotation::Ended);
        }
        if used_at.is_some() {
            sqlx::query("UPDATE sessions SET ended_at = now(), ended_why = 'refresh_reused' WHERE id = $1")
                .bind(session)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Rotation::Reused { session, user });
        }
        if too_old {
            sqlx::query("UPDATE sessions SET ended_at = now(), ended_why = 'max_age' WHERE id = $1")
                .bind(session)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Rotation::TooOld { session });
        }
        if expired {
            return Ok(Rotation::Expired);
        }
        let account = sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND suspended_at IS NULL"
        )))
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(account) = account else {
            return Ok(Rotation::Ended);
        };
        sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        let expires_at = next_expires_at.min(family_ends_at);
        insert_refresh(&mut tx, next_hash, session, expires_at).await?;
        sqlx::query("UPDATE sessions SET refreshed_at = now() WHERE id = $1").bind(session).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Rotation::Rotated { session, user: user_row(account)?, expires_at })
    }

    /// Ends a session (its refresh tokens and access tokens stop working).
    pub async fn end_session(&self, session: uuid::Uuid, why: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE sessions SET ended_at = now(), ended_why = $2 WHERE id = $1 AND ended_at IS NULL")
            .bind(session)
            .bind(why)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The account behind an access token, if its session is live and the account exists and
    /// is not suspended, in one query. The API caches the answer per session (see its
    /// `session_cache`), kept current by the triggers of `20261129000008_session_cache.sql`.
    pub async fn session_user(&self, session: uuid::Uuid, id: UserId) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE id = $1 AND suspended_at IS NULL
               AND EXISTS (SELECT 1 FROM sessions WHERE id = $2 AND user_id = $1 AND ended_at IS NULL)"
        )))
        .bind(id)
        .bind(session)
        .fetch_optional(&self.pool)
        .await?
        .map(user_row)
        .transpose()
    }

    /// Suspends an account (ending every session) or lifts the suspension. `false` when there
    /// is no such account, or it is the system account.
    pub async fn set_suspended(&self, id: UserId, suspended: bool) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE users SET suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END
             WHERE id = $1 AND role <> 'system'",
        )
        .bind(id)
        .bind(suspended)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if changed && suspended {
            sqlx::query(
                "UPDATE sessions SET ended_at = now(), ended_why = 'suspended' WHERE user_id = $1 AND ended_at IS NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Whether logins to `email` must wait, and until when.
    pub async fn login_block(&self, email: &str) -> Result<Option<LoginBlock>, DbError> {
        Ok(sqlx::query_as::<_, (DateTime<Utc>, bool)>(
            "SELECT blocked_until, locked FROM login_failures WHERE email = lower($1) AND blocked_until > now()",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?
        .map(|(until, locked)| LoginBlock { until, locked }))
    }

    /// Counts a failed login to `email` and blocks the next ones as `policy` says. Failures
    /// older than the lockout period are forgotten first.
    pub async fn login_failed(&self, email: &str, policy: &LoginPolicy) -> Result<Option<LoginBlock>, DbError> {
        let mut tx = self.pool.begin().await?;
        let failures: i32 = sqlx::query_scalar(
            "INSERT INTO login_failures (email, failures, last_failed_at) VALUES (lower($1), 1, now())
             ON CONFLICT (email) DO UPDATE SET
               failures = CASE WHEN login_failures.last_failed_at < now() - make_interval(secs => $2)
                               THEN 1 ELSE login_failures.failures + 1 END,
               last_failed_at = now()
             RETURNING failures",
        )
        .bind(email)
        .bind(policy.lockout.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?;
        let failures = u32::try_from(failures).unwrap_or(u32::MAX);
        let block = policy.block_after(failures);
        let (wait, locked) = match block {
            Some((wait, locked)) => (Some(wait.as_secs_f64()), locked),
            None => (None, false),
        };
        let until: Option<DateTime<Utc>> = sqlx::query_scalar(
            "UPDATE login_failures SET blocked_until = now() + make_interval(secs => $2), locked = $3
             WHERE email = lower($1) RETURNING blocked_until",
        )
        .bind(email)
        .bind(wait)
        .bind(locked)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(until.map(|until| LoginBlock { until, locked }))
    }

    /// Forgets the failed logins to `email` (after a successful one).
    pub async fn login_succeeded(&self, email: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM login_failures WHERE email = lower($1)").bind(email).execute(&self.pool).await?;
        Ok(())
    }
}

impl PgUsers {
    /// Records an OAuth login in flight (and forgets the expired ones).
    pub async fn save_oauth_state(
        &self,
        state_hash: &[u8],
        provider: &str,
        verifier: &str,
        redirect_to: &str,
        ttl: std::time::Duration,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM oauth_states WHERE expires_at < now()").execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO oauth_states (state_hash, provider, verifier, redirect_to, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
        )
        .bind(state_hash)
        .bind(provider)
        .bind(verifier)
        .bind(redirect_to)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Consumes an OAuth login in flight: its PKCE verifier and where to send the user after.
    /// `None` when unknown, used, expired or started with another provider.
    pub async fn take_oauth_state(
        &self,
        state_hash: &[u8],
        provider: &str,
    ) -> Result<Option<(String, String)>, DbError> {
        Ok(sqlx::query_as(
            "DELETE FROM oauth_states WHERE state_hash = $1 AND provider = $2 AND expires_at > now()
             RETURNING verifier, redirect_to",
        )
        .bind(state_hash)
        .bind(provider)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The account linked to a provider's account.
    pub async fn by_identity(&self, provider: &str, subject: &str) -> Result<Option<UserRow>, DbError> {
        sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE id = (SELECT user_id FROM oauth_identities WHERE provider = $1 AND subject = $2)"
        )))
        .bind(provider)
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?
        .map(user_row)
        .transpose()
    }

    /// Links a provider's account to ours (idempotent).
    pub async fn link_identity(&self, provider: &str, subject: &str, user: UserId) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO oauth_identities (provider, subject, user_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(provider)
        .bind(subject)
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Creates an account with no password (it logs in through its provider), under the first
    /// free username of `base`, `base-2`, `base-3`… Its email counts as verified: only an
    /// address the provider verified creates an account.
    pub async fn create_without_password(&self, email: &str, base: &str) -> Result<UserRow, DbError> {
        for attempt in 1..=20 {
            let username = if attempt == 1 {
                base.to_owned()
            } else {
                let suffix = format!("-{attempt}");
                format!("{}{suffix}", &base[..base.len().min(30 - suffix.len())])
            };
            let inserted = sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
                "INSERT INTO users (id, email, username, email_verified_at) VALUES ($1, $2, $3, now())
                 RETURNING {USER_COLUMNS}"
            )))
            .bind(UserId::new())
            .bind(email)
            .bind(&username)
            .fetch_one(&self.pool)
            .await;
            match inserted {
                Ok(row) => return user_row(row),
                Err(sqlx::Error::Database(err))
                    if err.code().as_deref() == Some("23505") && err.constraint() == Some("users_username_key") =>
                {
                    continue;
                }
                Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("23505") => {
                    return Err(DbError::Conflict("an account with this email already exists".into()));
                }
                Err(err) => return Err(err.into()),
            }
        }
        Err(DbError::Conflict(format!("no free username like {base:?}")))
    }
}

/// What a token sent by mail is for; a token of one purpose is worthless for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    VerifyEmail,
    ResetPassword,
}

impl TokenPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::VerifyEmail => "verify_email",
            TokenPurpose::ResetPassword => "reset_password",
        }
    }
}

/// At most this many live tokens of one purpose per account, issued within the last hour: a
/// mailbox cannot be flooded through one account, and the table stays small.
pub const TOKENS_PER_HOUR: i64 = 5;

impl PgUsers {
    /// Stores a mailed token (its hash) of `purpose` for `user` at `email`, valid for `ttl`.
    /// `false`, and nothing stored, when the account already has [`TOKENS_PER_HOUR`] live
    /// tokens of this purpose from the last hour. Forgets every expired token, so the table
    /// holds only live ones.
    pub async fn issue_token(
        &self,
        purpose: TokenPurpose,
        user: UserId,
        email: &str,
        hash: &[u8],
        ttl: std::time::Duration,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        // One issuer at a time per account, so the count below holds.
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE").bind(user).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM account_tokens WHERE expires_at <= now()").execute(&mut *tx).await?;
        let recent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM account_tokens
             WHERE user_id = $1 AND purpose = $2 AND created_at > now() - interval '1 hour'",
        )
        .bind(user)
        .bind(purpose.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if recent >= TOKENS_PER_HOUR {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO account_tokens (token_hash, purpose, user_id, email, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(user)
        .bind(email)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Consumes a token of `purpose` (issued to `holder`, when given): the account it was
    /// issued to, if the token is known, unexpired, and the account still has the address the
    /// token was mailed to. A known token is consumed even when it no longer applies.
    async fn take_token(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        purpose: TokenPurpose,
        hash: &[u8],
        holder: Option<UserId>,
    ) -> Result<Option<UserId>, DbError> {
        let taken = sqlx::query_as::<_, (UserId, String, bool)>(
            "DELETE FROM account_tokens WHERE token_hash = $1 AND purpose = $2 AND ($3::uuid IS NULL OR user_id = $3)
             RETURNING user_id, email, expires_at > now()",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(holder)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((user, email, true)) = taken else {
            return Ok(None);
        };
        let same: Option<UserId> = sqlx::query_scalar(
            "SELECT id FROM users WHERE id = $1 AND lower(email) = lower($2) AND role <> 'system' FOR UPDATE",
        )
        .bind(user)
        .bind(email)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(same)
    }

    /// Uses an email-verification token of `user`'s: marks the account's address verified and
    /// forgets its other verification tokens. `None` when the token is unknown, another
    /// account's, used, expired or stale.
    pub async fn verify_email(&self, user: UserId, hash: &[u8]) -> Result<Option<UserRow>, DbError> {
        let mut tx = self.pool.begin().await?;
        let Some(user) = Self::take_token(&mut tx, TokenPurpose::VerifyEmail, hash, Some(user)).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let row = sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = $1
             RETURNING {USER_COLUMNS}"
        )))
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM account_tokens WHERE user_id = $1 AND purpose = 'verify_email'")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        user_row(row).map(Some)
    }

    /// Uses a password-reset token: sets the new password hash, marks the address verified
    /// (the token came through the mailbox), ends every session of the account, forgets its
    /// reset tokens and its failed logins. `None` when the token is unknown, used, expired or
    /// stale.
    pub async fn reset_password(&self, hash: &[u8], password_hash: &str) -> Result<Option<UserRow>, DbError> {
        let mut tx = self.pool.begin().await?;
        let Some(user) = Self::take_token(&mut tx, TokenPurpose::ResetPassword, hash, None).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let row = sqlx::query_as::<_, UserTuple>(sqlx::AssertSqlSafe(format!(
            "UPDATE users SET password_hash = $2, email_verified_at = coalesce(email_verified_at, now())
             WHERE id = $1 RETURNING {USER_COLUMNS}"
        )))
        .bind(user)
        .bind(password_hash)
        .fetch_one(&mut *tx)
        .await?;
        let row = user_row(row)?;
        sqlx::query(
            "UPDATE sessions SET ended_at = now(), ended_why = 'password_reset' WHERE user_id = $1 AND ended_at IS NULL",
        )
        .bind(user)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM account_tokens WHERE user_id = $1 AND purpose = 'reset_password'")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM login_failures WHERE email = lower($1)").bind(&row.email).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(row))
    }
}

/// Stores a refresh token's hash in its session.
async fn insert_refresh(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    hash: &[u8],
    session: uuid::Uuid,
    expires_at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(hash)
        .bind(session)
        .bind(expires_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What came of using a refresh token.
#[derive(Debug, Clone)]
pub enum Rotation {
    /// Replaced; here is the session's account, and when the new token expires.
    Rotated { session: uuid::Uuid, user: UserRow, expires_at: DateTime<Utc> },
    /// Used before: the session has now ended.
    Reused { session: uuid::Uuid, user: UserId },
    /// Past its lifetime.
    Expired,
    /// Its session is older than the family's absolute lifetime: the session has now ended.
    TooOld { session: uuid::Uuid },
    /// Its session ended (logout, reuse, suspension).
    Ended,
    /// No such token.
    Unknown,
}

/// Logins to an email are refused until `until`: a growing delay, or a lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginBlock {
    pub until: DateTime<Utc>,
    pub locked: bool,
}

/// How failed logins slow down further attempts on the same account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginPolicy {
    /// Failures before each next attempt must wait (1 s, doubling, at most 60 s).
    pub delay_after: u32,
    /// Failures before the account is locked for `lockout`.
    pub lockout_after: u32,
    /// The lockout's length, and how long failures are remembered.
    pub lockout: std::time::Duration,
}

impl LoginPolicy {
    /// After `failures` failures in a row: how long the next attempt must wait, and whether
    /// that is a lockout.
    pub fn block_after(&self, failures: u32) -> Option<(std::time::Duration, bool)> {
        if failures >= self.lockout_after {
            Some((self.lockout, true))
        } else if failures >= self.delay_after {
            let doublings = (failures - self.delay_after).min(6);
            Some((std::time::Duration::from_secs((1u64 << doublings).min(60)), false))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_wait_longer_then_lock() {
        let policy = LoginPolicy { delay_after: 3, lockout_after: 10, lockout: std::time::Duration::from_secs(900) };
        let waits: Vec<_> =
            (1..=11).map(|n| policy.block_after(n).map(|(wait, locked)| (wait.as_secs(), locked))).collect();
        assert_eq!(
            waits,
            [
                None,
                None,
                Some((1, false)),
                Some((2, false)),
                Some((4, false)),
                Some((8, false)),
                Some((16, false)),
                Some((32, false)),
                Some((60, false)),
                Some((900, true)),
                Some((900, true)),
            ]
        );
    }
}
