//! Billing settings (Stripe): on when the secret key, the webhook signing secret and the
//! premium price are all set, off (the billing routes answer 503 `billing_disabled`) when none
//! is; a part of them is an error that names what is missing.

use secrecy::SecretString;
use url::Url;

use super::{ConfigError, Raw};

/// Stripe billing, when configured.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Stripe's secret API key (`sk_live_…`, `sk_test_…` or a restricted `rk_…` key).
    pub secret_key: SecretString,
    /// The webhook endpoint's signing secrets (`whsec_…`): the current one, and during a
    /// rotation the previous ones too; an event signed with any of them is accepted.
    pub webhook_secrets: Vec<SecretString>,
    /// The Stripe price (`price_…`) of the premium subscription.
    pub price_premium: String,
    /// Where Stripe's API answers (a test double on loopback in the tests), without the
    /// trailing `/v1`.
    pub api_base: Url,
    /// Where Checkout sends the customer after paying; Stripe replaces `{CHECKOUT_SESSION_ID}`.
    pub success_url: String,
    /// Where Checkout sends a customer who turns back.
    pub cancel_url: String,
    /// Where the customer portal's "return" link leads.
    pub portal_return_url: String,
}

/// The values of the billing keys, as taken from the layers.
pub(super) struct RawBilling {
    pub(super) secret_key: Option<Raw>,
    pub(super) webhook_secret: Option<Raw>,
    pub(super) price_premium: Option<Raw>,
    pub(super) api_base: Option<Raw>,
    pub(super) success_url: Option<Raw>,
    pub(super) cancel_url: Option<Raw>,
}

fn missing(name: &str, present: &[&str]) -> ConfigError {
    ConfigError::Invalid {
        setting: super::env_name(name),
        expected: format!("a value: billing needs it with {}", present.join(", ")),
        got: "nothing".to_owned(),
    }
}

fn web_url(raw: &Raw, example: &str) -> Result<String, ConfigError> {
    let text = raw.value.trim();
    Url::parse(text)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
        .ok_or_else(|| raw.invalid(format!("an http(s) URL such as {example}")))?;
    Ok(text.to_owned())
}

pub(super) fn parse(raw: RawBilling, app_url: &Url) -> Result<Option<BillingSettings>, ConfigError> {
    let api_base = match &raw.api_base {
        Some(base) => super::parse_service_base(base)?,
        None => Url::parse("https://api.stripe.com").map_err(|err| ConfigError::Invalid {
            setting: "stripe_api_base".into(),
            expected: "a URL".into(),
            got: err.to_string(),
        })?,
    };
    let success_url = match &raw.success_url {
        Some(url) => web_url(url, "https://app.example.com/billing/success?session_id={CHECKOUT_SESSION_ID}")?,
        None => format!("{}billing/success?session_id={{CHECKOUT_SESSION_ID}}", with_slash(app_url)),
    };
    let cancel_url = match &raw.cancel_url {
        Some(url) => web_url(url, "https://app.example.com/billing/cancel")?,
        None => format!("{}billing/cancel", with_slash(app_url)),
    };
    let named = [
        ("stripe_secret_key", raw.secret_key.is_some()),
        ("stripe_webhook_secret", raw.webhook_secret.is_some()),
        ("stripe_price_premium", raw.price_premium.is_some()),
    ];
    let present: Vec<&str> = named.iter().filter(|(_, set)| *set).map(|(name, _)| *name).collect();
    let (Some(secret_key), Some(webhook_secret), Some(price)) = (raw.secret_key, raw.webhook_secret, raw.price_premium)
    else {
        return match named.iter().find(|(_, set)| !*set) {
            Some((name, _)) if !present.is_empty() => Err(missing(name, &present)),
            _ => Ok(None),
        };
    };
    let key = secret_key.value.trim();
    let key_ok = ["sk_", "rk_"].iter().any(|prefix| key.starts_with(prefix))
        && key.len() <= 255
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !key_ok {
        return Err(secret_key.invalid("a Stripe secret key (sk_… or rk_…)"));
    }
    let secrets: Vec<&str> =
        webhook_secret.value.split(',').map(str::trim).filter(|secret| !secret.is_empty()).collect();
    if secrets.is_empty() || secrets.len() > 8 || secrets.iter().any(|secret| secret.len() < 16 || secret.len() > 255) {
        return Err(webhook_secret.invalid("one to eight comma-separated signing secrets (whsec_…), 16–255 bytes each"));
    }
    let price_premium = price.value.trim();
    if price_premium.is_empty() || price_premium.len() > 255 || !price_premium.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(price.invalid("a Stripe price id such as price_1Abc…"));
    }
    Ok(Some(BillingSettings {
        secret_key: SecretString::from(key.to_owned()),
        webhook_secrets: secrets.into_iter().map(|secret| SecretString::from(secret.to_owned())).collect(),
        price_premium: price_premium.to_owned(),
        api_base,
        success_url,
        cancel_url,
        portal_return_url: app_url.as_str().to_owned(),
    }))
}

fn with_slash(url: &Url) -> String {
    let text = url.as_str();
    if text.ends_with('/') { text.to_owned() } else { format!("{text}/") }
}
