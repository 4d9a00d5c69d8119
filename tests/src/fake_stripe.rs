//! A fake Stripe API on loopback, for the billing tests: the five calls Waveline makes
//! (`POST /v1/customers`, `DELETE /v1/customers/{id}`, `POST /v1/checkout/sessions`,
//! `/v1/billing_portal/sessions`, `GET /v1/subscriptions/{id}`), strict where Stripe is, and
//! webhook events signed the way Stripe signs them.
//!
//! - Every call needs `Authorization: Bearer` with the test's secret key (401 otherwise, with
//!   Stripe's error body), and POSTs need a form body.
//! - A customer created again with the same `Idempotency-Key` is the same customer.
//! - Deleting a customer answers Stripe's `{"id", "object": "customer", "deleted": true}` and
//!   cancels its subscriptions, as Stripe does; one it does not have (never created, or
//!   deleted already) is 404 `resource_missing`.
//! - [`FakeStripe::set_failing`] makes every call answer 500 `api_error` (still recorded)
//!   until it is turned off: Stripe having an outage.
//! - Subscriptions are what the test says they are ([`FakeStripe::set_subscription`]): reading
//!   one answers the whole object in Stripe's shape (every field `async-stripe` requires), or
//!   404 `resource_missing`.
//! - What each call sent is kept ([`FakeStripe::seen`]): form parameters decoded, in order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use hmac::{Hmac, Mac};
use poem::http::StatusCode;
use poem::web::{Data, Json, Path};
use poem::{EndpointExt, IntoResponse, Response, Route, delete, get, handler, post};
use serde_json::{Value, json};
use sha2::Sha256;

/// The secret key the tests configure.
pub const SECRET_KEY: &str = "sk_test_waveline_fake_0123456789";
/// The premium price the tests configure.
pub const PRICE: &str = "price_premium_monthly";

/// One call to the fake.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The form parameters, decoded (`line_items[0][price]` and so on).
    pub form: Vec<(String, String)>,
    pub idempotency_key: Option<String>,
}

impl Call {
    /// The first value of a form parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// A subscription as the test wants Stripe to describe it.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    /// `active`, `past_due`, `canceled`, …
    pub status: String,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub created: i64,
}

#[derive(Debug, Default)]
pub struct State {
    pub calls: Vec<Call>,
    /// Customer ids by the idempotency key that created them.
    customers: HashMap<String, String>,
    /// The customers not deleted.
    live_customers: HashSet<String>,
    subscriptions: HashMap<String, Subscription>,
    next: u32,
    failing: bool,
}

impl State {
    /// The calls to `path` (such as `/v1/checkout/sessions`).
    pub fn calls_to(&self, path: &str) -> Vec<&Call> {
        self.calls.iter().filter(|call| call.path == path).collect()
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stripe_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    Json(json!({"error": {"type": kind, "code": code, "message": message}})).with_status(status).into_response()
}

/// Records the call.
fn record(req: &poem::Request, body: &[u8], state: &Shared) -> Call {
    let call = Call {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        form: url::form_urlencoded::parse(body).into_owned().collect(),
        idempotency_key: req.header("idempotency-key").map(str::to_owned),
    };
    lock(state).calls.push(call.clone());
    call
}

/// Stripe's answer to a call it does not take: a wrong key, or a POST that is not a form;
/// or any call while the fake is failing.
fn refusal(req: &poem::Request, state: &Shared) -> Option<Response> {
    if lock(state).failing {
        // Stripe's `api_error` carries no code.
        let body = json!({"error": {"type": "api_error", "message": "An unknown error occurred (failing on purpose)"}});
        return Some(Json(body).with_status(StatusCode::INTERNAL_SERVER_ERROR).into_response());
    }
    if req.header("authorization") != Some(format!("Bearer {SECRET_KEY}").as_str()) {
        return Some(stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "api_key_invalid",
            "Invalid API Key provided",
        ));
    }
    if req.method() == poem::http::Method::POST
        && req.header("content-type") != Some("application/x-www-form-urlencoded")
    {
        return Some(stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_invalid",
            "form expected",
        ));
    }
    None
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[handler]
fn create_customer(req: &poem::Request, body: Vec<u8>, Data(state): Data<&Shared>) -> Response {
    let call = record(req, &body, state);
    if let Some(refused) = refusal(req, state) {
        return refused;
    }
    let mut state = lock(state);
    let id = match call.idempotency_key.as_ref().and_then(|key| state.customers.get(key)) {
        Some(id) => id.clone(),
        None => {
            state.next += 1;
            let id = format!("cus_fake{}", state.next);
            if let Some(key) = call.idempotency_key.clone() {
                state.customers.insert(key, id.clone());
            }
            state.live_customers.insert(id.clone());
            id
        }
    };
    Json(json!({
        "id": id, "object": "customer", "created": now(), "livemode": false,
        "email": call.param("email"), "name": call.param("name"),
        "metadata": {"waveline_account": call.param("metadata[waveline_account]")},
    }))
    .into_response()
}

#[handler]
fn delete_customer(req: &poem::Request, Path(id): Path<String>, Data(state): Data<&Shared>) -> Response {
    record(req, &[], state);
    if let Some(refused) = refusal(req, state) {
        return refused;
    }
    let mut state = lock(state);
    if !state.live_customers.remove(&id) {
        return stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            &format!("No such customer: '{id}'"),
        );
    }
    for sub in state.subscriptions.values_mut().filter(|sub| sub.customer == id) {
        sub.status = "canceled".into();
    }
    Json(json!({"id": id, "object": "customer", "deleted": true})).into_response()
}

#[handler]
fn create_checkout_session(req: &poem::Request, body: Vec<u8>, Data(state): Data<&Shared>) -> Response {
    let call = record(req, &body, state);
    if let Some(refused) = refusal(req, state) {
        return refused;
    }
    let mut state = lock(state);
    state.next += 1;
    let id = format!("cs_test_fake{}", state.next);
    Json(json!({
        "id": id, "object": "checkout.session", "created": now(), "expires_at": now() + 86_400,
        "livemode": false, "mode": call.param("mode"), "customer": call.param("customer"),
        "client_reference_id": call.param("client_reference_id"),
        "automatic_tax": {"enabled": false}, "custom_fields": [], "custom_text": {},
        "payment_method_types": ["card"], "payment_status": "unpaid", "shipping_options": [],
        "status": "open", "success_url": call.param("success_url"), "cancel_url": call.param("cancel_url"),
        "url": format!("https://checkout.stripe.test/c/pay/{id}"),
    }))
    .into_response()
}

#[handler]
fn create_portal_session(req: &poem::Request, body: Vec<u8>, Data(state): Data<&Shared>) -> Response {
    let call = record(req, &body, state);
    if let Some(refused) = refusal(req, state) {
        return refused;
    }
    let mut state = lock(state);
    state.next += 1;
    let id = format!("bps_fake{}", state.next);
    Json(json!({
        "id": id, "object": "billing_portal.session", "configuration": "bpc_fake", "created": now(),
        "customer": call.param("customer"), "livemode": false, "return_url": call.param("return_url"),
        "url": format!("https://billing.stripe.test/p/session/{id}"),
    }))
    .into_response()
}

/// A subscription in Stripe's shape, with the fields `async-stripe` requires.
pub fn subscription_json(sub: &Subscription) -> Value {
    let price = json!({
        "id": PRICE, "object": "price", "active": true, "billing_scheme": "per_unit", "created": sub.created,
        "currency": "usd", "livemode": false, "metadata": {}, "product": "prod_fake_premium", "type": "recurring",
        "unit_amount": 999, "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
    });
    let plan = json!({
        "id": PRICE, "object": "plan", "active": true, "billing_scheme": "per_unit", "created": sub.created,
        "currency": "usd", "interval": "month", "interval_count": 1, "livemode": false, "usage_type": "licensed",
        "amount": 999, "product": "prod_fake_premium",
    });
    let start = sub.current_period_end - 30 * 86_400;
    json!({
        "id": sub.id, "object": "subscription", "customer": sub.customer, "status": sub.status,
        "automatic_tax": {"enabled": false}, "billing_cycle_anchor": sub.created, "billing_mode": {"type": "classic"},
        "billing_schedules": [], "cancel_at_period_end": sub.cancel_at_period_end,
        "canceled_at": if sub.status == "canceled" { Some(now()) } else { None },
        "collection_method": "charge_automatically", "created": sub.created, "currency": "usd", "discounts": [],
        "invoice_settings": {"issuer": {"type": "self"}}, "livemode": false, "metadata": {},
        "start_date": sub.created,
        "items": {"object": "list", "has_more": false, "url": format!("/v1/subscription_items?subscription={}", sub.id),
            "data": [{
                "id": format!("si_{}", sub.id), "object": "subscription_item", "created": sub.created,
                "current_period_start": start, "current_period_end": sub.current_period_end, "discounts": [],
                "metadata": {}, "plan": plan, "price": price, "quantity": 1, "subscription": sub.id,
            }]},
    })
}

#[handler]
fn retrieve_subscription(req: &poem::Request, Path(id): Path<String>, Data(state): Data<&Shared>) -> Response {
    record(req, &[], state);
    if let Some(refused) = refusal(req, state) {
        return refused;
    }
    match lock(state).subscriptions.get(&id) {
        Some(sub) => Json(subscription_json(sub)).into_response(),
        None => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            &format!("No such subscription: '{id}'"),
        ),
    }
}

/// The running fake.
#[derive(Debug)]
pub struct FakeStripe {
    /// `http://127.0.0.1:PORT`: `stripe_api_base`.
    pub base: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Result<FakeStripe> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let state: Shared = Arc::default();
        let app = Route::new()
            .at("/v1/customers", post(create_customer))
            .at("/v1/customers/:id", delete(delete_customer))
            .at("/v1/checkout/sessions", post(create_checkout_session))
            .at("/v1/billing_portal/sessions", post(create_portal_session))
            .at("/v1/subscriptions/:id", get(retrieve_subscription))
            .data(state.clone());
        let server = poem::Server::new(poem::listener::TcpListener::bind(format!("127.0.0.1:{port}")));
        let task = tokio::spawn(async move {
            let _ = server.run(app).await;
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            ensure!(Instant::now() < deadline, "the fake Stripe did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(FakeStripe { base: format!("http://127.0.0.1:{port}"), state, task })
    }

    /// The settings that point Waveline at the fake, with these webhook secrets.
    pub fn env(&self, webhook_secrets: &str) -> Vec<(String, String)> {
        vec![
            ("WAVELINE_STRIPE_SECRET_KEY".into(), SECRET_KEY.into()),
            ("WAVELINE_STRIPE_WEBHOOK_SECRET".into(), webhook_secrets.into()),
            ("WAVELINE_STRIPE_PRICE_PREMIUM".into(), PRICE.into()),
            ("WAVELINE_STRIPE_API_BASE".into(), self.base.clone()),
        ]
    }

    /// From now on, Stripe describes the subscription so.
    pub fn set_subscription(&self, sub: Subscription) {
        lock(&self.state).subscriptions.insert(sub.id.clone(), sub);
    }

    /// Whether every call fails (500 `api_error`) from now on.
    pub fn set_failing(&self, failing: bool) {
        lock(&self.state).failing = failing;
    }

    /// Whether Stripe has the customer (created and not deleted).
    pub fn has_customer(&self, id: &str) -> bool {
        lock(&self.state).live_customers.contains(id)
    }

    /// The customer is deleted at Stripe by someone else (the dashboard, an earlier call).
    pub fn remove_customer(&self, id: &str) {
        lock(&self.state).live_customers.remove(id);
    }

    /// What the fake has seen so far.
    pub fn seen<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&lock(&self.state))
    }
}

/// The `Stripe-Signature` header Stripe would send for `body` at `timestamp`, one `v1` per
/// secret.
pub fn signature_header(secrets: &[&str], timestamp: i64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            continue;
        };
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        let hex: String = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
        header.push_str(&format!(",v1={hex}"));
    }
    header
}

/// A webhook event in Stripe's envelope.
pub fn event(id: &str, kind: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id, "object": "event", "api_version": "2025-09-30.clover", "created": created, "livemode": false,
        "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null}, "type": kind,
        "data": {"object": object},
    })
}
