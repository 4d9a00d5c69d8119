//! Billing and premium access end to end: the real `waveline` against a fake Stripe API
//! (`waveline_tests::fake_stripe`), with webhook events the test signs itself the way Stripe
//! does. What is checked is what a client sees: statuses, codes, the account's tier, what a
//! listener can play, and what Stripe was asked.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_tests::fake_stripe::{self, FakeStripe, PRICE, Subscription};
use waveline_tests::stack::{Mode, Stack, User, json, register_and_login, upload, wait_ready};

const SECRET: &str = "whsec_current_secret_0123456789";
const PREVIOUS: &str = "whsec_previous_secret_0123456789";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A billing stack: Stripe pointed at the fake, both webhook secrets of a rotation held.
async fn start(mode: Mode, stripe: &FakeStripe, extra: &[(&str, &str)]) -> Result<Stack> {
    let mut env = stripe.env(&format!("{SECRET},{PREVIOUS}"));
    env.push(("WAVELINE_SOCIAL_WRITES_PER_MINUTE".into(), "0".into()));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Stack::start(mode, true, &env).await
}

async fn post(base: &str, path: &str, user: &User) -> Result<(u16, Value)> {
    json(reqwest::Client::new().post(format!("{base}{path}")).bearer_auth(&user.token).send().await?).await
}

async fn me(base: &str, user: &User) -> Result<Value> {
    let (status, body) =
        json(reqwest::Client::new().get(format!("{base}/v1/me")).bearer_auth(&user.token).send().await?).await?;
    ensure!(status == 200, "{status} {body}");
    Ok(body)
}

/// Delivers a webhook body with a signature header, as Stripe would.
async fn deliver(stack: &Stack, body: &[u8], signature: Option<String>) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .post(stack.url("/v1/billing/webhook"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    json(request.send().await?).await
}

/// Delivers an event signed with `secrets` now.
async fn send_event(stack: &Stack, event: &Value, secrets: &[&str]) -> Result<(u16, Value)> {
    let body = serde_json::to_vec(event)?;
    deliver(stack, &body, Some(fake_stripe::signature_header(secrets, now(), &body))).await
}

/// `GET` a path as `user` (or anonymously): the status and the `code` of an error body.
async fn get(base: &str, path: &str, user: Option<&User>) -> Result<(u16, String, String)> {
    let mut request = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let code = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["code"].as_str().map(str::to_owned));
    Ok((status, code.unwrap_or_default(), text))
}

fn subscription(id: &str, customer: &str, status: &str, created: i64) -> Subscription {
    Subscription {
        id: id.into(),
        customer: customer.into(),
        status: status.into(),
        current_period_end: created + 30 * 86_400,
        cancel_at_period_end: false,
        created,
    }
}

async fn ready_track(stack: &Stack, owner: &User, wav: &[u8], fields: &[(&str, &str)]) -> Result<String> {
    let (status, track) = upload(stack, owner, fields, ("t.wav", wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

fn tone(secs: f64) -> Result<Vec<u8>> {
    let dir = waveline_tests::temp_dir()?;
    let path = dir.path().join("tone.wav");
    waveline_tests::audio::tone(&path, secs, 22050, 1, &[])?;
    Ok(std::fs::read(&path)?)
}

/// Checkout and portal against the fake: the right form reached Stripe, the customer is
/// created once and reused.
async fn checkout_and_portal(stack: &Stack, stripe: &FakeStripe, listener: &User) -> Result<String> {
    let (status, body) = post(&stack.base, "/v1/billing/portal", listener).await?;
    ensure!(status == 409 && body["code"] == "no_customer", "{status} {body}");
    let (status, body) = post(&stack.base, "/v1/billing/checkout", listener).await?;
    ensure!(status == 200, "{status} {body}");
    let url = body["url"].as_str().context("url")?;
    ensure!(url.starts_with("https://checkout.stripe.test/c/pay/cs_test_fake"), "{url}");
    let (customers, sessions) =
        stripe.seen(|seen| (seen.calls_to("/v1/customers").len(), seen.calls_to("/v1/checkout/sessions").len()));
    ensure!((customers, sessions) == (1, 1), "{customers} customers, {sessions} sessions");
    let (customer, session) = stripe
        .seen(|seen| (seen.calls_to("/v1/customers")[0].clone(), seen.calls_to("/v1/checkout/sessions")[0].clone()));
    ensure!(customer.param("email") == Some(listener.email.as_str()), "{customer:?}");
    ensure!(customer.param("metadata[waveline_account]") == Some(listener.id.as_str()), "{customer:?}");
    ensure!(customer.idempotency_key.is_some(), "the customer is created with an idempotency key");
    ensure!(session.param("mode") == Some("subscription"), "{session:?}");
    ensure!(session.param("line_items[0][price]") == Some(PRICE), "{session:?}");
    ensure!(session.param("line_items[0][quantity]") == Some("1"), "{session:?}");
    ensure!(session.param("customer") == Some("cus_fake1"), "{session:?}");
    ensure!(session.param("client_reference_id") == Some(listener.id.as_str()), "{session:?}");
    ensure!(
        session.param("subscription_data[metadata][waveline_account]") == Some(listener.id.as_str()),
        "{session:?}"
    );
    let success = session.param("success_url").context("success_url")?;
    ensure!(success.ends_with("/billing/success?session_id={CHECKOUT_SESSION_ID}"), "{success}");
    ensure!(session.param("cancel_url").is_some_and(|url| url.ends_with("/billing/cancel")), "{session:?}");

    // A second checkout reuses the customer.
    let (status, body) = post(&stack.base, "/v1/billing/checkout", listener).await?;
    ensure!(status == 200, "{status} {body}");
    let checkouts = stripe.seen(|seen| {
        seen.calls_to("/v1/checkout/sessions")
            .iter()
            .map(|c| c.param("customer").map(str::to_owned))
            .collect::<Vec<_>>()
    });
    ensure!(checkouts == vec![Some("cus_fake1".to_owned()); 2], "{checkouts:?}");
    ensure!(stripe.seen(|seen| seen.calls_to("/v1/customers").len()) == 1, "the customer is reused");

    let (status, body) = post(&stack.base, "/v1/billing/portal", listener).await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(
        body["url"].as_str().is_some_and(|url| url.starts_with("https://billing.stripe.test/p/session/")),
        "{body}"
    );
    let portal = stripe.seen(|seen| seen.calls_to("/v1/billing_portal/sessions")[0].clone());
    ensure!(portal.param("customer") == Some("cus_fake1") && portal.param("return_url").is_some(), "{portal:?}");
    Ok("cus_fake1".to_owned())
}

/// The variant lines of an HLS master playlist.
fn variants(master: &str) -> Vec<String> {
    master.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_change_the_tier_quota_and_access_embedded() -> Result<()> {
    let stripe = FakeStripe::start().await?;
    // A quota of 3 s: the artist's two 1 s tracks fit, one 3 s track of the listener's fills it.
    let stack = start(Mode::Embedded, &stripe, &[("WAVELINE_FREE_QUOTA_S", "3")]).await?;
    let base = stack.base.clone();
    let owner = register_and_login(&stack, "artist").await?;
    let listener = register_and_login(&stack, "listener").await?;
    let free = register_and_login(&stack, "freebie").await?;
    let wav = tone(1.0)?;
    let long = tone(3.0)?;

    let account = me(&base, &listener).await?;
    ensure!(account["tier"] == "free" && account["subscription"].is_null(), "{account}");
    let customer = checkout_and_portal(&stack, &stripe, &listener).await?;

    // The owner marks one track premium-only at upload, and another one later by PATCH.
    let exclusive = ready_track(&stack, &owner, &wav, &[("title", "exclusive"), ("premium_only", "true")]).await?;
    let open = ready_track(&stack, &owner, &wav, &[("title", "open")]).await?;
    let (status, _, text) = get(&base, &format!("/v1/tracks/{exclusive}"), Some(&owner)).await?;
    let track: Value = serde_json::from_str(&text)?;
    ensure!(status == 200 && track["premium_only"] == true && track["access"] == "playable", "{text}");

    // A free listener: the preview plays; the full streams and HLS do not.
    let (_, _, text) = get(&base, &format!("/v1/tracks/{exclusive}"), Some(&listener)).await?;
    let track: Value = serde_json::from_str(&text)?;
    ensure!(track["access"] == "preview" && track["premium_only"] == true, "{text}");
    let (_, _, text) = get(&base, &format!("/v1/tracks/{exclusive}"), None).await?;
    ensure!(serde_json::from_str::<Value>(&text)?["access"] == "preview", "anonymous: {text}");
    let (_, _, text) = get(&base, &format!("/v1/tracks/{open}"), Some(&listener)).await?;
    ensure!(serde_json::from_str::<Value>(&text)?["access"] == "playable", "{text}");
    for path in ["stream/mp3_128", "stream/opus_64", "hls/master.m3u8"] {
        let (status, code, text) = get(&base, &format!("/v1/tracks/{exclusive}/{path}"), Some(&listener)).await?;
        ensure!(status == 403 && code == "premium_required", "{path}: {status} {text}");
    }
    let (status, _, preview) = get(&base, &format!("/v1/tracks/{exclusive}/stream/preview"), Some(&listener)).await?;
    ensure!(status == 200 && !preview.is_empty(), "preview: {status}");
    // The open track's master lists 96k and 160k for a free listener, and 256k is refused.
    let (status, _, master) = get(&base, &format!("/v1/tracks/{open}/hls/master.m3u8"), Some(&listener)).await?;
    ensure!(status == 200, "{status} {master}");
    let free_variants = variants(&master);
    ensure!(free_variants.len() == 2 && !master.contains("256k"), "{master}");
    let (status, _, owners_master) = get(&base, &format!("/v1/tracks/{open}/hls/master.m3u8"), Some(&owner)).await?;
    let all_variants = variants(&owners_master);
    ensure!(status == 200 && all_variants.len() == 3, "the owner's master: {owners_master}");
    let premium_variant = all_variants.iter().find(|v| v.starts_with("256k/")).context("a 256k variant")?.clone();
    let (status, code, _) = get(&base, &format!("/v1/tracks/{open}/hls/{premium_variant}"), Some(&listener)).await?;
    ensure!(status == 403 && code == "premium_required", "256k to a free listener: {status} {code}");

    // Signed URLs carry the access they were signed with.
    let (_, _, text) = get(&base, &format!("/v1/tracks/{exclusive}/signed-urls"), Some(&free)).await?;
    let free_urls: Value = serde_json::from_str(&text)?;
    let free_stream = free_urls["stream_urls"]["mp3_128"].as_str().context("a signed stream")?.to_owned();
    ensure!(!free_stream.contains("/p."), "{free_stream}");
    let (status, code, _) = get(&base, &free_stream, None).await?;
    ensure!(status == 403 && code == "premium_required", "a free URL to a premium-only track: {status} {code}");
    let free_preview = free_urls["stream_urls"]["preview"].as_str().context("a signed preview")?;
    ensure!(get(&base, free_preview, None).await?.0 == 200, "the signed preview plays");
    // Claiming premium on a free signature is a forgery.
    let forged = free_stream.replacen(
        &format!("/v1/signed/{}/", free_stream.split('/').nth(3).context("expires")?),
        &format!("/v1/signed/{}/p.", free_stream.split('/').nth(3).context("expires")?),
        1,
    );
    let (status, code, _) = get(&base, &forged, None).await?;
    ensure!(status == 403 && code == "bad_signature", "{forged}: {status} {code}");

    // The free quota: one 3 s track fills it.
    ready_track(&stack, &listener, &long, &[("title", "mine")]).await?;
    let (status, body) = upload(&stack, &listener, &[("title", "more")], ("t.wav", &long)).await?;
    ensure!(status == 403 && body["code"] == "quota_exceeded", "{status} {body}");

    // Webhooks: a missing, wrong or stale signature is refused and changes nothing.
    let created = now();
    let completed = fake_stripe::event(
        "evt_checkout",
        "checkout.session.completed",
        created,
        json!({"id": "cs_test_fake2", "object": "checkout.session", "mode": "subscription",
               "customer": customer, "subscription": "sub_1", "client_reference_id": listener.id}),
    );
    let body = serde_json::to_vec(&completed)?;
    let (status, reply) = deliver(&stack, &body, None).await?;
    ensure!(status == 400 && reply["code"] == "signature_missing", "{status} {reply}");
    let wrong = fake_stripe::signature_header(&["whsec_not_ours_0123456789"], now(), &body);
    let (status, reply) = deliver(&stack, &body, Some(wrong)).await?;
    ensure!(status == 400 && reply["code"] == "signature_mismatch", "{status} {reply}");
    let stale = fake_stripe::signature_header(&[SECRET], now() - 600, &body);
    let (status, reply) = deliver(&stack, &body, Some(stale)).await?;
    ensure!(status == 400 && reply["code"] == "signature_expired", "{status} {reply}");
    let tampered = fake_stripe::signature_header(&[SECRET], now(), &body);
    let (status, reply) = deliver(&stack, &[&body[..], &b" "[..]].concat(), Some(tampered)).await?;
    ensure!(status == 400 && reply["code"] == "signature_mismatch", "{status} {reply}");
    let (status, reply) = deliver(&stack, b"{}", Some(fake_stripe::signature_header(&[SECRET], now(), b"{}"))).await?;
    ensure!(status == 400 && reply["code"] == "invalid_event", "{status} {reply}");
    ensure!(me(&base, &listener).await?["tier"] == "free");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_events").fetch_one(&stack.db.pool).await?;
    ensure!(events == 0, "{events} events recorded from refused deliveries");

    // The checkout completes, signed with the previous secret of a rotation: premium at once.
    stripe.set_subscription(subscription("sub_1", &customer, "active", created));
    let (status, reply) = send_event(&stack, &completed, &[PREVIOUS]).await?;
    ensure!(status == 200 && reply["duplicate"] == false, "{status} {reply}");
    let account = me(&base, &listener).await?;
    ensure!(account["tier"] == "premium", "{account}");
    let sub = &account["subscription"];
    ensure!(sub["status"] == "active" && sub["cancel_at_period_end"] == false, "{account}");
    let period_end = chrono::DateTime::parse_from_rfc3339(sub["current_period_end"].as_str().context("period end")?)?;
    ensure!(period_end.timestamp() == created + 30 * 86_400, "{account}");
    let reads = stripe.seen(|seen| seen.calls_to("/v1/subscriptions/sub_1").len());
    ensure!(reads == 1, "the subscription is read from Stripe: {reads}");

    // Premium plays in full, gets 256k, and uploads past the free quota.
    let (status, _, _) = get(&base, &format!("/v1/tracks/{exclusive}/stream/mp3_128"), Some(&listener)).await?;
    ensure!(status == 200, "a premium listener's full stream: {status}");
    let (_, _, text) = get(&base, &format!("/v1/tracks/{exclusive}"), Some(&listener)).await?;
    ensure!(serde_json::from_str::<Value>(&text)?["access"] == "playable", "{text}");
    let (_, _, master) = get(&base, &format!("/v1/tracks/{exclusive}/hls/master.m3u8"), Some(&listener)).await?;
    ensure!(variants(&master).len() == 3, "{master}");
    let (status, _, _) = get(&base, &format!("/v1/tracks/{open}/hls/{premium_variant}"), Some(&listener)).await?;
    ensure!(status == 200, "256k to a premium listener: {status}");
    let extra = ready_track(&stack, &listener, &long, &[("title", "more")]).await?;
    ensure!(!extra.is_empty());
    let (_, _, text) = get(&base, &format!("/v1/tracks/{exclusive}/signed-urls"), Some(&listener)).await?;
    let premium_stream =
        serde_json::from_str::<Value>(&text)?["stream_urls"]["mp3_128"].as_str().context("signed")?.to_owned();
    ensure!(premium_stream.contains("/p."), "{premium_stream}");
    ensure!(get(&base, &premium_stream, None).await?.0 == 200, "a premium-signed URL plays");

    // A replayed event changes nothing, and Stripe is not asked again.
    let (status, reply) = send_event(&stack, &completed, &[SECRET]).await?;
    ensure!(status == 200 && reply["duplicate"] == true, "{status} {reply}");
    ensure!(stripe.seen(|seen| seen.calls_to("/v1/subscriptions/sub_1").len()) == 1, "a replay reads nothing");

    // Out of order: the deletion arrives before an older update; the account stays free.
    stripe.set_subscription(subscription("sub_1", &customer, "canceled", created));
    let object =
        |status: &str| json!({"id": "sub_1", "object": "subscription", "customer": customer, "status": status});
    let deleted = fake_stripe::event("evt_deleted", "customer.subscription.deleted", created + 20, object("canceled"));
    let updated = fake_stripe::event("evt_updated", "customer.subscription.updated", created + 10, object("active"));
    let (status, reply) = send_event(&stack, &deleted, &[SECRET]).await?;
    ensure!(status == 200 && reply["duplicate"] == false, "{status} {reply}");
    let (status, reply) = send_event(&stack, &updated, &[SECRET]).await?;
    ensure!(status == 200 && reply["duplicate"] == false, "{status} {reply}");
    let account = me(&base, &listener).await?;
    ensure!(account["tier"] == "free" && account["subscription"]["status"] == "canceled", "{account}");
    let (status, code, _) = get(&base, &format!("/v1/tracks/{exclusive}/stream/mp3_128"), Some(&listener)).await?;
    ensure!(status == 403 && code == "premium_required", "free again at once: {status} {code}");
    let (status, body) = upload(&stack, &listener, &[("title", "over")], ("t.wav", &long)).await?;
    ensure!(status == 403 && body["code"] == "quota_exceeded", "the quota is back: {status} {body}");
    // A URL signed while premium keeps its access for its lifetime.
    ensure!(get(&base, &premium_stream, None).await?.0 == 200, "the premium-signed URL still plays");

    // A new subscription, then a failed payment (Stripe moves it to past_due): free again.
    stripe.set_subscription(subscription("sub_2", &customer, "active", created + 30));
    let created_event =
        fake_stripe::event("evt_created", "customer.subscription.created", created + 30, json!({"id": "sub_2"}));
    ensure!(send_event(&stack, &created_event, &[SECRET]).await?.0 == 200);
    ensure!(me(&base, &listener).await?["tier"] == "premium");
    let paid = fake_stripe::event(
        "evt_paid",
        "invoice.paid",
        created + 31,
        json!({"id": "in_1", "object": "invoice", "subscription": "sub_2"}),
    );
    ensure!(send_event(&stack, &paid, &[SECRET]).await?.0 == 200);
    ensure!(me(&base, &listener).await?["tier"] == "premium");
    stripe.set_subscription(subscription("sub_2", &customer, "past_due", created + 30));
    let failed = fake_stripe::event(
        "evt_failed",
        "invoice.payment_failed",
        created + 40,
        json!({"id": "in_2", "object": "invoice", "parent": {"subscription_details": {"subscription": "sub_2"}}}),
    );
    ensure!(send_event(&stack, &failed, &[SECRET]).await?.0 == 200);
    let account = me(&base, &listener).await?;
    ensure!(account["tier"] == "free" && account["subscription"]["status"] == "past_due", "{account}");

    // The owner takes premium-only off by PATCH: everyone plays it.
    let response = reqwest::Client::new()
        .patch(stack.url(&format!("/v1/tracks/{exclusive}")))
        .bearer_auth(&owner.token)
        .json(&json!({"premium_only": false}))
        .send()
        .await?;
    let (status, track) = json(response).await?;
    ensure!(status == 200 && track["premium_only"] == false, "{status} {track}");
    let (status, _, _) = get(&base, &format!("/v1/tracks/{exclusive}/stream/mp3_128"), Some(&free)).await?;
    ensure!(status == 200, "no longer premium-only: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_reaches_every_replica_distributed() -> Result<()> {
    let stripe = FakeStripe::start().await?;
    let stack = start(Mode::Distributed, &stripe, &[]).await?;
    let replica = stack.replica().await?;
    let owner = register_and_login(&stack, "artist").await?;
    let listener = register_and_login(&stack, "listener").await?;
    let wav = tone(2.0)?;
    let exclusive = ready_track(&stack, &owner, &wav, &[("title", "exclusive"), ("premium_only", "true")]).await?;
    let stream = format!("/v1/tracks/{exclusive}/stream/mp3_128");
    // Both replicas know the listener (their session caches hold the free account).
    for base in [stack.base.clone(), replica.url("")] {
        let (status, code, _) = get(&base, &stream, Some(&listener)).await?;
        ensure!(status == 403 && code == "premium_required", "{base}: {status} {code}");
    }
    let (status, body) = post(&stack.base, "/v1/billing/checkout", &listener).await?;
    ensure!(status == 200, "{status} {body}");
    let created = now();
    stripe.set_subscription(subscription("sub_9", "cus_fake1", "active", created));
    let event = fake_stripe::event("evt_9", "customer.subscription.created", created, json!({"id": "sub_9"}));
    let (status, reply) = send_event(&stack, &event, &[SECRET]).await?;
    ensure!(status == 200, "{status} {reply}");
    // The other replica hears of the change through PostgreSQL and plays it in full.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = get(&replica.url(""), &stream, Some(&listener)).await?;
        if status == 200 {
            break;
        }
        ensure!(Instant::now() < deadline, "the replica still refuses after 10 s: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(me(&replica.url(""), &listener).await?["tier"] == "premium");
    Ok(())
}

/// `DELETE /v1/me` with the account's password: the status and the error body (`null` for
/// the empty 204).
async fn delete_account(stack: &Stack, user: &User) -> Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .delete(stack.url("/v1/me"))
        .bearer_auth(&user.token)
        .json(&json!({"password": user.password}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
}

/// The rows an account has: itself, its Stripe customer, its subscriptions, its playlists.
async fn rows_of(stack: &Stack, user: &User) -> Result<[i64; 4]> {
    let id: uuid::Uuid = user.id.parse()?;
    let mut counts = [0; 4];
    for (n, sql) in [
        "SELECT count(*) FROM users WHERE id = $1",
        "SELECT count(*) FROM billing_customers WHERE user_id = $1",
        "SELECT count(*) FROM subscriptions WHERE user_id = $1",
        "SELECT count(*) FROM playlists WHERE owner_id = $1",
    ]
    .into_iter()
    .enumerate()
    {
        counts[n] = sqlx::query_scalar(sql).bind(id).fetch_one(&stack.db.pool).await?;
    }
    Ok(counts)
}

/// Signing in with the account's password: the status.
async fn sign_in(stack: &Stack, user: &User) -> Result<u16> {
    let response = reqwest::Client::new()
        .post(stack.url("/v1/auth/login"))
        .json(&json!({"email": user.email, "password": user.password}))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The DELETE calls Stripe received, as paths.
fn deletions(stripe: &FakeStripe) -> Vec<String> {
    stripe.seen(|seen| seen.calls.iter().filter(|c| c.method == "DELETE").map(|c| c.path.clone()).collect())
}

/// Checks `user` out and makes the subscription `sub` active by its webhook event: a premium
/// account with a Stripe customer. Returns the customer's id.
async fn subscribe(stack: &Stack, stripe: &FakeStripe, user: &User, sub: &str) -> Result<String> {
    let (status, body) = post(&stack.base, "/v1/billing/checkout", user).await?;
    ensure!(status == 200, "{status} {body}");
    let customer = stripe
        .seen(|seen| seen.calls_to("/v1/checkout/sessions").last().and_then(|c| c.param("customer").map(str::to_owned)))
        .context("the checkout named no customer")?;
    let created = now();
    stripe.set_subscription(subscription(sub, &customer, "active", created));
    let event = fake_stripe::event(&format!("evt_{sub}"), "customer.subscription.created", created, json!({"id": sub}));
    let (status, reply) = send_event(stack, &event, &[SECRET]).await?;
    ensure!(status == 200, "{status} {reply}");
    ensure!(me(&stack.base, user).await?["tier"] == "premium");
    Ok(customer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_deletes_its_stripe_customer_first_embedded() -> Result<()> {
    let stripe = FakeStripe::start().await?;
    let stack = start(Mode::Embedded, &stripe, &[]).await?;
    let payer = register_and_login(&stack, "payer").await?;
    let customer = subscribe(&stack, &stripe, &payer, "sub_payer").await?;
    ensure!(rows_of(&stack, &payer).await? == [1, 1, 1, 0], "{:?}", rows_of(&stack, &payer).await?);

    // Stripe is down: 503, and nothing of the account went anywhere.
    let (status, body) = json(
        reqwest::Client::new()
            .post(stack.url("/v1/playlists"))
            .bearer_auth(&payer.token)
            .json(&json!({"title": "Mix"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201, "{status} {body}");
    let playlist = body["id"].as_str().context("playlist id")?.to_owned();
    stripe.set_failing(true);
    let (status, body) = delete_account(&stack, &payer).await?;
    ensure!(status == 503 && body["code"] == "billing_unavailable", "{status} {body}");
    stripe.set_failing(false);
    ensure!(deletions(&stripe) == [format!("/v1/customers/{customer}")], "{:?}", deletions(&stripe));
    ensure!(stripe.has_customer(&customer), "the failed call deleted the customer");
    ensure!(rows_of(&stack, &payer).await? == [1, 1, 1, 1], "{:?}", rows_of(&stack, &payer).await?);
    ensure!(sign_in(&stack, &payer).await? == 200, "the account no longer signs in");
    let account = me(&stack.base, &payer).await?;
    ensure!(account["tier"] == "premium" && account["subscription"]["status"] == "active", "{account}");
    let (status, _, _) = get(&stack.base, &format!("/v1/playlists/{playlist}"), Some(&payer)).await?;
    ensure!(status == 200, "the playlist went: {status}");

    // Stripe is back: the retry deletes the customer (its subscription with it), then the
    // account, with one more DELETE.
    let (status, body) = delete_account(&stack, &payer).await?;
    ensure!(status == 204, "{status} {body}");
    let path = format!("/v1/customers/{customer}");
    ensure!(deletions(&stripe) == [path.clone(), path], "{:?}", deletions(&stripe));
    ensure!(!stripe.has_customer(&customer), "the customer is still at Stripe");
    ensure!(rows_of(&stack, &payer).await? == [0, 0, 0, 0], "{:?}", rows_of(&stack, &payer).await?);
    ensure!(sign_in(&stack, &payer).await? == 401, "a deleted account signs in");
    // Stripe then reports the cancellation; for a customer of no account it changes nothing.
    let object = json!({"id": "sub_payer", "object": "subscription", "customer": customer, "status": "canceled"});
    let cancelled = fake_stripe::event("evt_cancelled", "customer.subscription.deleted", now(), object);
    let (status, reply) = send_event(&stack, &cancelled, &[SECRET]).await?;
    ensure!(status == 200 && reply["duplicate"] == false, "{status} {reply}");
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE username = 'payer'").fetch_one(&stack.db.pool).await?;
    ensure!(users == 0, "the event brought the account back");

    // A customer Stripe no longer has (deleted there already) does not stop the deletion;
    // an account that never checked out asks Stripe nothing.
    let gone = register_and_login(&stack, "gone").await?;
    let gone_customer = subscribe(&stack, &stripe, &gone, "sub_gone").await?;
    stripe.remove_customer(&gone_customer);
    let (status, body) = delete_account(&stack, &gone).await?;
    ensure!(status == 204, "{status} {body}");
    ensure!(deletions(&stripe).last() == Some(&format!("/v1/customers/{gone_customer}")), "{:?}", deletions(&stripe));
    ensure!(rows_of(&stack, &gone).await? == [0, 0, 0, 0], "{:?}", rows_of(&stack, &gone).await?);
    let free = register_and_login(&stack, "free").await?;
    let before = deletions(&stripe).len();
    let (status, body) = delete_account(&stack, &free).await?;
    ensure!(status == 204 && deletions(&stripe).len() == before, "{status} {body} {:?}", deletions(&stripe));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stripe_settings_billing_answers_billing_disabled() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let user = register_and_login(&stack, "listener").await?;
    for path in ["/v1/billing/checkout", "/v1/billing/portal"] {
        let (status, body) = post(&stack.base, path, &user).await?;
        ensure!(status == 503 && body["code"] == "billing_disabled", "{path}: {status} {body}");
    }
    let body = br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{}}}"#;
    let (status, reply) = deliver(&stack, body, Some(fake_stripe::signature_header(&[SECRET], now(), body))).await?;
    ensure!(status == 503 && reply["code"] == "billing_disabled", "{status} {reply}");
    let account = me(&stack.base, &user).await?;
    ensure!(account["tier"] == "free" && account["subscription"].is_null(), "{account}");

    // An account with a Stripe customer (billing was on once) cannot be deleted here: its
    // subscription would go on being charged. One without deletes as ever.
    let payer = register_and_login(&stack, "payer").await?;
    sqlx::query("INSERT INTO billing_customers (user_id, customer_id) VALUES ($1, 'cus_from_before')")
        .bind(payer.id.parse::<uuid::Uuid>()?)
        .execute(&stack.db.pool)
        .await?;
    let (status, body) = delete_account(&stack, &payer).await?;
    ensure!(status == 503 && body["code"] == "billing_disabled", "{status} {body}");
    ensure!(body["message"].as_str().is_some_and(|m| m.contains("cannot be cancelled")), "{body}");
    ensure!(rows_of(&stack, &payer).await? == [1, 1, 0, 0], "{:?}", rows_of(&stack, &payer).await?);
    ensure!(sign_in(&stack, &payer).await? == 200, "the refused account no longer signs in");
    let (status, body) = delete_account(&stack, &user).await?;
    ensure!(status == 204, "{status} {body}");
    ensure!(rows_of(&stack, &user).await? == [0, 0, 0, 0]);
    Ok(())
}
