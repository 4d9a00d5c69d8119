//! Billing (migration `…_billing.sql`): each account's Stripe customer, its subscriptions as
//! last read from Stripe, the webhook events already applied, and the tier that follows.
//!
//! - **The tier is decided where the subscription is written.** [`EventTx::apply_subscription`]
//!   upserts the subscription and sets the account's `tier` in the same transaction: premium
//!   while any subscription of the account is `active` or `trialing`, free otherwise. The
//!   upload quota ([`super::PgTracks::quota_usage`], [`super::PgTracks::admit`]) and the API's
//!   access checks read that column, and a trigger drops every cached session of an account
//!   whose tier changes.
//! - **An event applies once.** [`PgBilling::begin_event`] inserts the event id in the
//!   transaction that applies it: a redelivered event finds it and changes nothing, and two
//!   deliveries at once take turns on the id's unique index.
//! - **One subscription at a time.** [`EventTx::lock_subscription`] holds a transaction-scoped
//!   advisory lock on the subscription id, so the caller's read of the subscription from
//!   Stripe and its write here are not interleaved with another event's for the same one: the
//!   last write is always of the last read.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use super::DbError;
use crate::domain::UserId;

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Uploads up to `free_quota_s` of audio; premium-only tracks play as previews.
    Free,
    /// Unlimited uploads, premium-only tracks in full, the 256 kb/s HLS variant.
    Premium,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Premium => "premium",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Tier, DbError> {
        match text {
            "free" => Ok(Tier::Free),
            "premium" => Ok(Tier::Premium),
            other => Err(DbError::Invalid(format!("unknown tier {other:?}"))),
        }
    }
}

/// Subscription statuses that make an account premium.
pub const PREMIUM_STATUSES: [&str; 2] = ["active", "trialing"];

/// A subscription as Stripe's API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub customer_id: String,
    /// Stripe's status: `active`, `trialing`, `past_due`, `canceled`, `unpaid`, …
    pub status: String,
    pub price_id: Option<String>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    /// When Stripe created it.
    pub created: DateTime<Utc>,
}

/// Billing rows in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgBilling {
    pool: PgPool,
}

impl PgBilling {
    pub fn new(pool: PgPool) -> PgBilling {
        PgBilling { pool }
    }

    /// The Stripe customer of an account, once it has one.
    pub async fn customer_of(&self, user: UserId) -> Result<Option<String>, DbError> {
        Ok(sqlx::query_scalar("SELECT customer_id FROM billing_customers WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Records the account's customer, unless it has one already; answers the one it keeps.
    pub async fn set_customer(&self, user: UserId, customer: &str) -> Result<String, DbError> {
        sqlx::query("INSERT INTO billing_customers (user_id, customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(user)
            .bind(customer)
            .execute(&self.pool)
            .await?;
        self.customer_of(user)
            .await?
            .ok_or_else(|| DbError::Conflict(format!("customer {customer} belongs to another account")))
    }

    /// The account's subscription to show: a premium one if any, else the newest.
    pub async fn subscription_of(&self, user: UserId) -> Result<Option<Subscription>, DbError> {
        let row: Option<SubscriptionRow> = sqlx::query_as(
            "SELECT id, customer_id, status, price_id, current_period_end, cancel_at_period_end, created_at
             FROM subscriptions WHERE user_id = $1
             ORDER BY status = ANY($2) DESC, created_at DESC, id DESC LIMIT 1",
        )
        .bind(user)
        .bind(&PREMIUM_STATUSES[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Subscription::from))
    }

    /// Starts applying webhook event `id`; `None` when it was applied before (nothing to do).
    pub async fn begin_event(&self, id: &str, kind: &str) -> Result<Option<EventTx>, DbError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query("INSERT INTO billing_events (id, type) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(id)
            .bind(kind)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        Ok((inserted == 1).then_some(EventTx { tx }))
    }
}

type SubscriptionRow = (String, String, String, Option<String>, Option<DateTime<Utc>>, bool, DateTime<Utc>);

impl From<SubscriptionRow> for Subscription {
    fn from(
        (id, customer_id, status, price_id, current_period_end, cancel_at_period_end, created): SubscriptionRow,
    ) -> Subscription {
        Subscription { id, customer_id, status, price_id, current_period_end, cancel_at_period_end, created }
    }
}

/// The transaction applying one webhook event; dropped without [`EventTx::commit`], nothing
/// of it stays (the event id included, so a redelivery tries again).
#[derive(Debug)]
pub struct EventTx {
    tx: Transaction<'static, Postgres>,
}

/// What applying a subscription changed for its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub user: UserId,
    pub before: Tier,
    pub after: Tier,
}

impl EventTx {
    /// Waits for, then holds until the end of the transaction, the lock of subscription `id`.
    pub async fn lock_subscription(&mut self, id: &str) -> Result<(), DbError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('waveline.subscription:' || $1, 0))")
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// The account of a Stripe customer.
    pub async fn user_of_customer(&mut self, customer: &str) -> Result<Option<UserId>, DbError> {
        Ok(sqlx::query_scalar("SELECT user_id FROM billing_customers WHERE customer_id = $1")
            .bind(customer)
            .fetch_optional(&mut *self.tx)
            .await?)
    }

    /// Links a customer to an account that has none (a checkout's `client_reference_id`);
    /// answers the account the customer belongs to, `None` when the account is gone.
    pub async fn link_customer(&mut self, user: UserId, customer: &str) -> Result<Option<UserId>, DbError> {
        sqlx::query(
            "INSERT INTO billing_customers (user_id, customer_id)
             SELECT id, $2 FROM users WHERE id = $1
             ON CONFLICT DO NOTHING",
        )
        .bind(user)
        .bind(customer)
        .execute(&mut *self.tx)
        .await?;
        self.user_of_customer(customer).await
    }

    /// Stores the subscription as read from Stripe for `user`, and sets the account's tier
    /// from all of its subscriptions.
    pub async fn apply_subscription(&mut self, user: UserId, sub: &Subscription) -> Result<Applied, DbError> {
        let before: Option<String> = sqlx::query_scalar("SELECT tier FROM users WHERE id = $1 FOR NO KEY UPDATE")
            .bind(user)
            .fetch_optional(&mut *self.tx)
            .await?;
        let Some(before) = before else {
            return Err(DbError::Invalid(format!("no user {user}")));
        };
        sqlx::query(
            "INSERT INTO subscriptions
                 (id, user_id, customer_id, status, price_id, current_period_end, cancel_at_period_end, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET
                 user_id = EXCLUDED.user_id, customer_id = EXCLUDED.customer_id, status = EXCLUDED.status,
                 price_id = EXCLUDED.price_id, current_period_end = EXCLUDED.current_period_end,
                 cancel_at_period_end = EXCLUDED.cancel_at_period_end, created_at = EXCLUDED.created_at,
                 updated_at = now()",
        )
        .bind(&sub.id)
        .bind(user)
        .bind(&sub.customer_id)
        .bind(&sub.status)
        .bind(&sub.price_id)
        .bind(sub.current_period_end)
        .bind(sub.cancel_at_period_end)
        .bind(sub.created)
        .execute(&mut *self.tx)
        .await?;
        let after: String = sqlx::query_scalar(
            "UPDATE users SET tier = CASE WHEN EXISTS
                 (SELECT 1 FROM subscriptions WHERE user_id = $1 AND status = ANY($2)) THEN 'premium' ELSE 'free' END
             WHERE id = $1 RETURNING tier",
        )
        .bind(user)
        .bind(&PREMIUM_STATUSES[..])
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(Applied { user, before: Tier::parse(&before)?, after: Tier::parse(&after)? })
    }

    /// Makes the event's effects, and its id, permanent.
    pub async fn commit(self) -> Result<(), DbError> {
        self.tx.commit().await?;
        Ok(())
    }
}
