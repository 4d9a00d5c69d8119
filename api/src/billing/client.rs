//! The calls Waveline makes to Stripe's API, through `async-stripe` (hyper 1, rustls on
//! aws-lc-rs): create and delete a customer, a Checkout Session, a customer-portal session,
//! and read a subscription. Every call has a timeout; the base URL is `stripe_api_base`, so the tests run
//! against a fake Stripe on loopback.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::RetrieveSubscription;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_core::customer::{CreateCustomer, DeleteCustomer};
use waveline_shared::config::BillingSettings;
use waveline_shared::db::UserRow;
use waveline_shared::db::billing::Subscription;
use waveline_shared::domain::UserId;

/// How long one call to Stripe may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key naming the Waveline account on Stripe's objects.
pub const ACCOUNT_KEY: &str = "waveline_account";

/// Why a call to Stripe failed.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// `code` is Stripe's error code (`resource_missing`, …), empty when it gave none.
    #[error("Stripe answered {status} {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("Stripe did not answer: {0}")]
    Unreachable(String),
    #[error("Stripe's answer lacks {0}")]
    Incomplete(&'static str),
    #[error("Stripe's answer is not what was expected: {0}")]
    Unreadable(String),
    #[error("the Stripe client cannot be built: {0}")]
    Config(String),
}

impl StripeError {
    /// Whether asking again later may work (a webhook answers 5xx then, so Stripe retries).
    pub fn is_transient(&self) -> bool {
        match self {
            StripeError::Refused { status, .. } => matches!(status, 409 | 429 | 500..=599),
            StripeError::Unreachable(_) => true,
            StripeError::Incomplete(_) | StripeError::Unreadable(_) | StripeError::Config(_) => false,
        }
    }
}

impl From<stripe::StripeError> for StripeError {
    fn from(err: stripe::StripeError) -> StripeError {
        match err {
            stripe::StripeError::Stripe(api, status) => StripeError::Refused {
                status,
                code: api.code.as_ref().map(|code| code.as_str().to_owned()).unwrap_or_default(),
                message: api.message.unwrap_or_default(),
            },
            stripe::StripeError::JSONDeserialize(message) => StripeError::Unreadable(message),
            other => StripeError::Unreachable(other.to_string()),
        }
    }
}

/// Stripe's API with Waveline's billing settings.
#[derive(Debug, Clone)]
pub struct StripeApi {
    client: stripe::Client,
    price: String,
    success_url: String,
    cancel_url: String,
    portal_return_url: String,
}

impl StripeApi {
    pub fn new(settings: &BillingSettings) -> Result<StripeApi, StripeError> {
        // async-stripe's connector takes the process's default TLS provider, and with both of
        // rustls's providers in the tree there is none until one is named (an `Err` here means
        // one was named already, which is as good).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // async-stripe appends `v1/…` to the base as given: it must end with a slash.
        let mut base = settings.api_base.as_str().to_owned();
        if !base.ends_with('/') {
            base.push('/');
        }
        let client = stripe::ClientBuilder::new(settings.secret_key.expose_secret())
            .url(base)
            .timeout(CALL_TIMEOUT)
            .app_info("waveline", Some(env!("CARGO_PKG_VERSION").to_owned()), None)
            .build()
            .map_err(|err| StripeError::Config(err.to_string()))?;
        Ok(StripeApi {
            client,
            price: settings.price_premium.clone(),
            success_url: settings.success_url.clone(),
            cancel_url: settings.cancel_url.clone(),
            portal_return_url: settings.portal_return_url.clone(),
        })
    }

    /// Creates the Stripe customer of an account. Idempotent per account: two checkouts at
    /// once get the same customer.
    pub async fn create_customer(&self, user: &UserRow) -> Result<String, StripeError> {
        let key = IdempotencyKey::new(format!("waveline-customer-{}", user.id))
            .map_err(|err| StripeError::Config(err.to_string()))?;
        let customer = CreateCustomer::new()
            .email(user.email.clone())
            .name(user.username.clone())
            .metadata(HashMap::from([(ACCOUNT_KEY.to_owned(), user.id.to_string())]))
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await?;
        Ok(customer.id.as_str().to_owned())
    }

    /// Deletes a customer, which cancels every subscription of it at once (Stripe's
    /// `DELETE /v1/customers/{id}`). `Ok(false)` when Stripe has no such customer: it was
    /// deleted before (an earlier attempt whose account deletion did not complete).
    pub async fn delete_customer(&self, customer: &str) -> Result<bool, StripeError> {
        match DeleteCustomer::new(customer).send(&self.client).await.map_err(StripeError::from) {
            Ok(_) => Ok(true),
            Err(StripeError::Refused { status: 404, code, .. }) if code == "resource_missing" => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// A Checkout Session for the premium subscription; answers its URL.
    pub async fn checkout(&self, customer: &str, user: UserId) -> Result<String, StripeError> {
        let line = CreateCheckoutSessionLineItems {
            price: Some(self.price.clone()),
            quantity: Some(1),
            ..CreateCheckoutSessionLineItems::new()
        };
        let metadata = HashMap::from([(ACCOUNT_KEY.to_owned(), user.to_string())]);
        let subscription = CreateCheckoutSessionSubscriptionData {
            metadata: Some(metadata),
            ..CreateCheckoutSessionSubscriptionData::new()
        };
        let session = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(customer)
            .client_reference_id(user.to_string())
            .line_items(vec![line])
            .subscription_data(subscription)
            .success_url(self.success_url.clone())
            .cancel_url(self.cancel_url.clone())
            .send(&self.client)
            .await?;
        session.url.ok_or(StripeError::Incomplete("the Checkout Session's url"))
    }

    /// A customer-portal session; answers its URL.
    pub async fn portal(&self, customer: &str) -> Result<String, StripeError> {
        let session = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(self.portal_return_url.clone())
            .send(&self.client)
            .await?;
        Ok(session.url)
    }

    /// A subscription as Stripe has it now.
    pub async fn subscription(&self, id: &str) -> Result<Subscription, StripeError> {
        let sub = RetrieveSubscription::new(id).send(&self.client).await?;
        let at = |seconds: i64| DateTime::<Utc>::from_timestamp(seconds, 0);
        // Since Stripe's 2025-03-31 API version the period is per item; one price, one item.
        let item = sub.items.data.first();
        Ok(Subscription {
            id: sub.id.as_str().to_owned(),
            customer_id: sub.customer.id().as_str().to_owned(),
            status: sub.status.as_str().to_owned(),
            price_id: item.map(|item| item.price.id.as_str().to_owned()),
            current_period_end: item.and_then(|item| at(item.current_period_end)),
            cancel_at_period_end: sub.cancel_at_period_end,
            created: at(sub.created).ok_or(StripeError::Incomplete("a valid `created`"))?,
        })
    }
}
