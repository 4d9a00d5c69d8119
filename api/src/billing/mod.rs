//! Billing: Stripe subscriptions and the account's tier.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/billing/checkout` | a Stripe Checkout Session for the premium subscription: `{url}` |
//! | `POST /v1/billing/portal` | the Stripe customer portal: `{url}`; 409 `no_customer` before a first checkout |
//! | `POST /v1/billing/webhook` | Stripe's events, signed ([`signature`]) |
//!
//! Without Stripe settings every route answers 503 `billing_disabled`.
//!
//! **Account deletion** ([`Billing::end_for_deletion`]) deletes the account's Stripe customer
//! before anything else of the account goes, which cancels its subscriptions at once.
//!
//! **Webhook.** The signature is checked over the raw body (read whole, at most
//! [`crate::body::WEBHOOK_MAX_BYTES`]) before anything parses it; a missing, malformed, stale or
//! wrong one is 400 with its code. Then one transaction applies the event: its id goes in
//! `billing_events` (a redelivery finds it and changes nothing), the subscription it concerns
//! is locked, read again from Stripe's API, and stored with the account's tier. Re-reading
//! rather than trusting the event's copy is what makes events that arrive out of order (Stripe
//! does not promise an order) harmless: whichever event comes last, the state written is
//! Stripe's latest, and the lock orders the read-and-write of concurrent events for one
//! subscription. If Stripe cannot be read, nothing is written and the answer is 503, so Stripe
//! delivers the event again later. Handled: `checkout.session.completed` (subscription mode:
//! links the customer to `client_reference_id` if it was not yet),
//! `customer.subscription.created|updated|deleted`, `invoice.paid` and
//! `invoice.payment_failed`; other events are acknowledged and ignored.
//!
//! **Tier.** Premium while a subscription of the account is `active` or `trialing`; a failed
//! payment (Stripe moves the subscription to `past_due`, then `unpaid` or `canceled`) or a
//! cancellation brings it back to free. The change reaches every API process's session cache
//! through the trigger on `users.tier`, and this process forgets the account's sessions at once.

pub mod client;
pub mod signature;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem_openapi::param::Header;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use waveline_shared::db::billing::Subscription;
use waveline_shared::db::{PgBilling, Tier, UserRow};
use waveline_shared::domain::UserId;

use self::client::{StripeApi, StripeError};
use crate::AppState;
use crate::auth::Auth;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Subscriptions (Stripe) and the premium tier.
    Billing,
}

/// Billing's rows, and Stripe when configured.
#[derive(Debug)]
pub struct Billing {
    pub db: PgBilling,
    stripe: Option<(StripeApi, Vec<SecretString>)>,
}

impl Billing {
    /// Billing as the settings configure it (off without Stripe settings).
    pub fn from_settings(
        settings: &waveline_shared::config::Settings,
        pool: sqlx::PgPool,
    ) -> Result<Billing, StripeError> {
        let stripe = match &settings.billing {
            Some(billing) => Some((StripeApi::new(billing)?, billing.webhook_secrets.clone())),
            None => None,
        };
        Ok(Billing { db: PgBilling::new(pool), stripe })
    }

    /// Whether Stripe is configured.
    pub fn enabled(&self) -> bool {
        self.stripe.is_some()
    }

    fn stripe(&self) -> Result<&(StripeApi, Vec<SecretString>), ApiError> {
        self.stripe.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "billing_disabled",
                "billing is not configured on this server",
            )
        })
    }
}

impl Billing {
    /// Ends the account's billing before the account is deleted: deletes its Stripe customer,
    /// which cancels every subscription of it at once, so a deleted account is never charged
    /// again. An account that never checked out has nothing to end. A customer Stripe no
    /// longer has (an earlier attempt deleted it) is as good as deleted.
    ///
    /// 503 `billing_unavailable` when Stripe fails, and 503 `billing_disabled` when the
    /// account has a customer but this server has no Stripe settings to cancel it with: the
    /// caller removes nothing then, so the account stays whole and the deletion can be tried
    /// again.
    pub(crate) async fn end_for_deletion(&self, user: UserId) -> Result<(), ApiError> {
        let Some(customer) = self.db.customer_of(user).await? else {
            return Ok(());
        };
        let Some((stripe, _)) = &self.stripe else {
            tracing::error!(%user, %customer, "cannot delete an account with a Stripe customer: billing is not configured");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "billing_disabled",
                "this account has a Stripe subscription that cannot be cancelled: billing is not configured on this \
                 server; the account was not deleted",
            ));
        };
        let deleted = stripe.delete_customer(&customer).await.map_err(|err| stripe_failed(&err))?;
        tracing::info!(%user, %customer, deleted, "the Stripe customer of a deleted account is gone");
        Ok(())
    }
}

/// Stripe failed: logged, and the client told to try again.
fn stripe_failed(err: &StripeError) -> ApiError {
    tracing::error!(error = %err, "a call to Stripe failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "billing_unavailable",
        "the payment provider is unavailable; try again",
    )
}

/// A page of Stripe's to send the customer to.
#[derive(Debug, Object)]
pub struct BillingUrl {
    url: String,
}

/// The webhook's acknowledgement.
#[derive(Debug, Object)]
pub struct WebhookAck {
    /// Whether the event had been applied before (nothing changed this time).
    duplicate: bool,
}

/// An account's subscription, as `GET /v1/me` shows it.
#[derive(Debug, Object)]
pub struct SubscriptionView {
    /// Stripe's status: `active`, `trialing`, `past_due`, `canceled`, `unpaid`, `incomplete`, …
    status: String,
    /// The end of the period paid for.
    current_period_end: Option<DateTime<Utc>>,
    /// Whether it ends at `current_period_end` rather than renewing.
    cancel_at_period_end: bool,
}

impl From<Subscription> for SubscriptionView {
    fn from(sub: Subscription) -> SubscriptionView {
        SubscriptionView {
            status: sub.status,
            current_period_end: sub.current_period_end,
            cancel_at_period_end: sub.cancel_at_period_end,
        }
    }
}

/// The subscription to show for an account, if any.
pub(crate) async fn subscription_view(state: &AppState, user: UserId) -> Result<Option<SubscriptionView>, ApiError> {
    Ok(state.billing.db.subscription_of(user).await?.map(SubscriptionView::from))
}

#[derive(ApiResponse)]
enum UrlResponse {
    /// Send the customer there.
    #[oai(status = 200)]
    Ok(Json<BillingUrl>),
}

#[derive(ApiResponse)]
enum WebhookResponse {
    /// Received; applied now or before.
    #[oai(status = 200)]
    Ok(Json<WebhookAck>),
}

/// The parts of a Stripe event we read; the rest of the body is Stripe's.
#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

/// An id field, whether Stripe sent the id or the expanded object.
fn id_of(value: Option<&serde_json::Value>) -> Option<&str> {
    match value? {
        serde_json::Value::String(id) => Some(id.as_str()),
        serde_json::Value::Object(object) => object.get("id")?.as_str(),
        _ => None,
    }
    .filter(|id| !id.is_empty() && id.len() <= 255)
}

/// What an event asks of us: read this subscription again (with, for a completed checkout,
/// the account and customer it names).
#[derive(Debug, PartialEq, Eq)]
struct Concern<'a> {
    subscription: &'a str,
    checkout: Option<(UserId, &'a str)>,
}

fn concern(event: &Event) -> Option<Concern<'_>> {
    let object = &event.data.object;
    match event.kind.as_str() {
        "checkout.session.completed" => {
            if object.get("mode").and_then(|mode| mode.as_str()) != Some("subscription") {
                return None;
            }
            let user = object.get("client_reference_id").and_then(|id| id.as_str()).and_then(|id| id.parse().ok());
            let customer = id_of(object.get("customer"));
            Some(Concern {
                subscription: id_of(object.get("subscription"))?,
                checkout: user.zip(customer).map(|(user, customer)| (UserId(user), customer)),
            })
        }
        "customer.subscription.created" | "customer.subscription.updated" | "customer.subscription.deleted" => {
            Some(Concern { subscription: id_of(object.get("id"))?, checkout: None })
        }
        "invoice.paid" | "invoice.payment_failed" => {
            // Where the subscription is named depends on the API version of the endpoint.
            let nested = object.get("parent").and_then(|parent| parent.get("subscription_details"));
            let subscription = id_of(object.get("subscription"))
                .or_else(|| id_of(nested.and_then(|details| details.get("subscription"))))?;
            Some(Concern { subscription, checkout: None })
        }
        _ => None,
    }
}

/// The billing routes.
#[derive(Debug)]
pub struct BillingApi {
    pub state: AppState,
}

impl BillingApi {
    /// The account's Stripe customer, created at its first checkout.
    async fn customer(&self, stripe: &StripeApi, user: &UserRow) -> Result<String, ApiError> {
        let billing = &self.state.billing;
        if let Some(customer) = billing.db.customer_of(user.id).await? {
            return Ok(customer);
        }
        let customer = stripe.create_customer(user).await.map_err(|err| stripe_failed(&err))?;
        Ok(billing.db.set_customer(user.id, &customer).await?)
    }

    /// Applies one verified event; `false` when it had been applied before.
    async fn apply(&self, stripe: &StripeApi, event: &Event) -> Result<bool, ApiError> {
        let db = &self.state.billing.db;
        let Some(mut tx) = db.begin_event(&event.id, &event.kind).await? else {
            return Ok(false);
        };
        let Some(concern) = concern(event) else {
            tx.commit().await?;
            return Ok(true);
        };
        tx.lock_subscription(concern.subscription).await?;
        let subscription = stripe.subscription(concern.subscription).await.map_err(|err| {
            tracing::warn!(event = %event.id, error = %err, transient = err.is_transient(), "cannot read the subscription; Stripe will deliver the event again");
            stripe_failed(&err)
        })?;
        let mut user = tx.user_of_customer(&subscription.customer_id).await?;
        if user.is_none()
            && let Some((account, customer)) = concern.checkout
            && customer == subscription.customer_id
        {
            user = tx.link_customer(account, customer).await?;
        }
        let Some(user) = user else {
            tracing::warn!(event = %event.id, customer = %subscription.customer_id, "an event for a customer of no account");
            tx.commit().await?;
            return Ok(true);
        };
        let applied = tx.apply_subscription(user, &subscription).await?;
        tx.commit().await?;
        if applied.before != applied.after {
            self.state.status_feed.sessions().forget_user(user);
            tracing::info!(%user, tier = applied.after.as_str(), subscription = %subscription.id, status = %subscription.status, "the account's tier changed");
        }
        Ok(true)
    }
}

#[OpenApi(tag = "Tag::Billing")]
impl BillingApi {
    /// Starts a premium subscription: a Stripe Checkout Session (subscription mode) for the
    /// signed-in account; send the customer to `url`. 409 `already_premium` for a premium
    /// account (the portal manages its subscription).
    #[oai(path = "/v1/billing/checkout", method = "post")]
    async fn checkout(&self, auth: Auth) -> Result<UrlResponse, ApiError> {
        let (stripe, _) = self.state.billing.stripe()?;
        let user = &auth.session().user;
        if user.tier == Tier::Premium {
            return Err(ApiError::conflict("already_premium", "this account is premium; manage it in the portal"));
        }
        let customer = self.customer(stripe, user).await?;
        let url = stripe.checkout(&customer, user.id).await.map_err(|err| stripe_failed(&err))?;
        Ok(UrlResponse::Ok(Json(BillingUrl { url })))
    }

    /// The Stripe customer portal of the signed-in account (change or cancel the
    /// subscription, invoices, payment methods). 409 `no_customer` before a first checkout.
    #[oai(path = "/v1/billing/portal", method = "post")]
    async fn portal(&self, auth: Auth) -> Result<UrlResponse, ApiError> {
        let (stripe, _) = self.state.billing.stripe()?;
        let customer = self.state.billing.db.customer_of(auth.session().user.id).await?.ok_or_else(|| {
            ApiError::conflict("no_customer", "this account has no billing yet; start with POST /v1/billing/checkout")
        })?;
        let url = stripe.portal(&customer).await.map_err(|err| stripe_failed(&err))?;
        Ok(UrlResponse::Ok(Json(BillingUrl { url })))
    }

    /// Stripe's webhook: events signed with the endpoint's secret (`Stripe-Signature`),
    /// applied once each. 400 `signature_missing`, `signature_malformed`, `signature_expired`
    /// (more than 5 min from now) or `signature_mismatch`; 400 `invalid_event` for a signed
    /// body that is not an event; 503 when Stripe could not be read (Stripe delivers again).
    #[oai(path = "/v1/billing/webhook", method = "post")]
    async fn webhook(
        &self,
        #[oai(name = "Stripe-Signature")] signature: Header<Option<String>>,
        body: Binary<Bytes>,
    ) -> Result<WebhookResponse, ApiError> {
        let (stripe, secrets) = self.state.billing.stripe()?;
        let secrets: Vec<&[u8]> = secrets.iter().map(|secret| secret.expose_secret().as_bytes()).collect();
        let header = signature.0.unwrap_or_default();
        signature::verify(&header, &body.0, &secrets, Utc::now().timestamp())
            .map_err(|err| ApiError::bad_request(err.code(), err.to_string()))?;
        let event: Event = serde_json::from_slice(&body.0)
            .map_err(|err| ApiError::bad_request("invalid_event", format!("the body is not a Stripe event: {err}")))?;
        if event.id.is_empty() || event.id.len() > 255 || event.kind.len() > 255 {
            return Err(ApiError::bad_request("invalid_event", "the event's id or type is out of bounds"));
        }
        let applied = self.apply(stripe, &event).await?;
        Ok(WebhookResponse::Ok(Json(WebhookAck { duplicate: !applied })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, object: serde_json::Value) -> Event {
        Event { id: "evt_1".into(), kind: kind.into(), data: EventData { object } }
    }

    #[test]
    fn each_handled_event_names_its_subscription() {
        let user = UserId::new();
        let checkout = event(
            "checkout.session.completed",
            serde_json::json!({"mode": "subscription", "subscription": "sub_1", "customer": "cus_1",
                               "client_reference_id": user.to_string()}),
        );
        assert_eq!(concern(&checkout), Some(Concern { subscription: "sub_1", checkout: Some((user, "cus_1")) }));
        let payment = event("checkout.session.completed", serde_json::json!({"mode": "payment"}));
        assert_eq!(concern(&payment), None);
        for kind in ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"]
        {
            let updated = event(kind, serde_json::json!({"id": "sub_2", "object": "subscription"}));
            assert_eq!(concern(&updated), Some(Concern { subscription: "sub_2", checkout: None }));
        }
        let old_style = event("invoice.paid", serde_json::json!({"subscription": "sub_3"}));
        assert_eq!(concern(&old_style).map(|c| c.subscription), Some("sub_3"));
        let new_style = event(
            "invoice.payment_failed",
            serde_json::json!({"subscription": null, "parent": {"subscription_details": {"subscription": "sub_4"}}}),
        );
        assert_eq!(concern(&new_style).map(|c| c.subscription), Some("sub_4"));
        let expanded = event("invoice.paid", serde_json::json!({"subscription": {"id": "sub_5"}}));
        assert_eq!(concern(&expanded).map(|c| c.subscription), Some("sub_5"));
        assert_eq!(concern(&event("invoice.paid", serde_json::json!({"subscription": 7}))), None);
        assert_eq!(concern(&event("customer.created", serde_json::json!({"id": "cus_1"}))), None);
    }
}
