//! Accounts and their mail, over real HTTP against `waveline serve`, which sends through its
//! real mail path (lettre over SMTP) to a sink the test reads: email verification, password
//! reset, registrations that do not tell which emails exist, the OAuth pre-takeover, suspended
//! accounts, the absolute lifetime of a session, and revocations reaching every replica
//! through the session cache.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_tests::oauth_provider::{Browser, FakeProvider, profile};
use waveline_tests::smtp_sink::SmtpSink;
use waveline_tests::stack::{
    Mode, Replica, Stack, User, json, login, register, register_and_login, set_cookie, set_cookies,
};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// A stack that mails to `sink` (and knows `provider`, when given).
async fn stack_with_mail(sink: &SmtpSink, provider: Option<&FakeProvider>, extra: &[(&str, &str)]) -> Result<Stack> {
    let mut env: Vec<(String, String)> = provider.map(FakeProvider::env).unwrap_or_default();
    env.push(("WAVELINE_SMTP_URL".into(), sink.url()));
    env.push(("WAVELINE_APP_URL".into(), "https://app.example.com".into()));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Stack::start(Mode::Embedded, false, &env).await
}

/// The status and JSON body (`null` when empty) of a request.
async fn answer(request: reqwest::RequestBuilder) -> Result<(u16, Value)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
}

async fn post(stack: &Stack, path: &str, body: Value) -> Result<(u16, Value)> {
    answer(client().post(stack.url(path)).json(&body)).await
}

async fn me(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    json(client().get(stack.url("/v1/me")).bearer_auth(token).send().await?).await
}

async fn refresh(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    post(stack, "/v1/auth/refresh", json!({"refresh_token": token})).await
}

/// `POST /v1/auth/email/verify` signed in as `user`.
async fn verify(stack: &Stack, user: &User, token: &str) -> Result<(u16, Value)> {
    answer(client().post(stack.url("/v1/auth/email/verify")).bearer_auth(&user.token).json(&json!({"token": token})))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_mails_a_single_use_verification_link() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let stack = stack_with_mail(&sink, None, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    let mail = sink.wait_for(&ann.email, 1).await?;
    ensure!(mail.subject == "Confirm your email address for Waveline", "{}", mail.subject);
    let code = mail.code()?;
    ensure!(
        mail.body.contains(&format!("https://app.example.com/verify-email?token={code}\n")),
        "the link: {}",
        mail.body
    );
    // Unverified accounts use the platform; /v1/me says what is pending.
    let (status, body) = me(&stack, &ann.token).await?;
    ensure!(status == 200 && body["email_verified"] == false, "{status} {body}");

    // A made-up token, another account's, or a verification token used to reset a password
    // does nothing; nor does the right token without a session.
    let (status, body) = verify(&stack, &ann, "made-up-token").await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "{status} {body}");
    let (status, _) = post(&stack, "/v1/auth/email/verify", json!({"token": code})).await?;
    ensure!(status == 401, "verified without a session: {status}");
    let carl = register_and_login(&stack, "carl").await?;
    let (status, body) = verify(&stack, &carl, &code).await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "carl verified with ann's token: {status} {body}");
    let (status, body) =
        post(&stack, "/v1/auth/password/reset", json!({"token": code, "password": "a-new-long-password"})).await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "a verification token reset a password: {status} {body}");

    // The token verifies the address once.
    let (status, body) = verify(&stack, &ann, &code).await?;
    ensure!(status == 204, "{status} {body}");
    let (_, body) = me(&stack, &ann.token).await?;
    ensure!(body["email_verified"] == true, "{body}");
    let (status, body) = verify(&stack, &ann, &code).await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "used twice: {status} {body}");
    let resend = |user: &User| client().post(stack.url("/v1/auth/email/resend")).bearer_auth(&user.token).send();
    let (status, body) = json(resend(&ann).await?).await?;
    ensure!(status == 409 && body["code"] == "email_already_verified", "{status} {body}");

    // A new link for a signed-in account; the links expire.
    let (status, _) = json(client().post(stack.url("/v1/auth/email/resend")).send().await?).await?;
    ensure!(status == 401, "resend without a session: {status}");
    let bob = register_and_login(&stack, "bob").await?;
    let first = sink.wait_for(&bob.email, 1).await?.code()?;
    let (status, body) = json(resend(&bob).await?).await?;
    ensure!(status == 202 && body["message"].is_string(), "{status} {body}");
    let second = sink.wait_for(&bob.email, 2).await?.code()?;
    ensure!(first != second, "the same token twice");
    sqlx::query("UPDATE account_tokens SET expires_at = now() - interval '1 second' WHERE email = $1")
        .bind(&bob.email)
        .execute(&stack.db.pool)
        .await?;
    for token in [&first, &second] {
        let (status, body) = verify(&stack, &bob, token).await?;
        ensure!(status == 404 && body["code"] == "token_invalid", "an expired token worked: {status} {body}");
    }
    let (_, body) = me(&stack, &bob.token).await?;
    ensure!(body["email_verified"] == false, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_taken_email_answers_the_same_and_mails_its_owner() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let stack = stack_with_mail(&sink, None, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    sink.wait_for(&ann.email, 1).await?;

    let taken = register(&stack, "ANN@example.com", "mallory", "mallory-long-password").await?;
    let fresh = register(&stack, "fresh@example.com", "fresh", "fresh-long-password").await?;
    ensure!(taken.0 == 202 && taken == fresh, "a taken email answers {taken:?}, a free one {fresh:?}");
    // Nothing was created for the taken email; its owner is told what happened.
    let notice = sink.wait_for(&ann.email, 2).await?;
    ensure!(notice.subject == "Someone tried to register with your address", "{}", notice.subject);
    ensure!(notice.body.contains("no new account was made") && !notice.body.contains("code: "), "{}", notice.body);
    let (status, body) = json(
        client()
            .post(stack.url("/v1/auth/login"))
            .json(&json!({"email": ann.email, "password": "mallory-long-password"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 401 && body["code"] == "invalid_credentials", "{status} {body}");
    let mallories: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE username = 'mallory'").fetch_one(&stack.db.pool).await?;
    ensure!(mallories == 0, "an account was created for a taken email");
    login(&stack, &ann.email, &ann.password, &[]).await?;
    // Usernames are public: a taken one may say so, whatever the email.
    for email in ["ann@example.com", "someone-new@example.com"] {
        let (status, body) = register(&stack, email, "ann", "another-long-password").await?;
        ensure!(status == 409 && body["code"] == "username_taken", "{email}: {status} {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_reset_works_once_and_ends_every_session() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let stack = stack_with_mail(&sink, None, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    let phone = login(&stack, &ann.email, &ann.password, &[]).await?;
    sink.wait_for(&ann.email, 1).await?;

    // The same answer whether or not the address has an account.
    let forgot = |email: &str| post(&stack, "/v1/auth/password/forgot", json!({"email": email}));
    let unknown = forgot("nobody@example.com").await?;
    let known = forgot(&ann.email).await?;
    ensure!(known.0 == 202 && known == unknown, "known: {known:?}, unknown: {unknown:?}");
    let mail = sink.wait_for(&ann.email, 2).await?;
    ensure!(mail.subject == "Reset your Waveline password", "{}", mail.subject);
    let code = mail.code()?;
    ensure!(mail.body.contains(&format!("https://app.example.com/reset-password?token={code}\n")), "{}", mail.body);
    // The mail jobs run in order: the unknown address's came first, and mailed nothing.
    ensure!(sink.to("nobody@example.com").is_empty(), "a mail went to an address without an account");

    // A weak password is refused and spends nothing; the token then works once.
    let reset = |token: &str, password: &str| {
        post(&stack, "/v1/auth/password/reset", json!({"token": token, "password": password}))
    };
    let (status, body) = reset(&code, "short").await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let (status, body) = reset(&code, "a-brand-new-password").await?;
    ensure!(status == 204, "{status} {body}");
    let (status, body) = reset(&code, "yet-another-password").await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "used twice: {status} {body}");

    // Every session has ended: access and refresh tokens alike.
    for (device, user) in [("laptop", &ann), ("phone", &phone)] {
        let (status, _) = me(&stack, &user.token).await?;
        ensure!(status == 401, "the {device}'s access token still works");
        let (status, body) = refresh(&stack, &user.refresh).await?;
        ensure!(status == 401 && body["code"] == "session_ended", "the {device}'s refresh: {status} {body}");
    }
    let (status, _) = post(&stack, "/v1/auth/login", json!({"email": ann.email, "password": ann.password})).await?;
    ensure!(status == 401, "the old password still works");
    let fresh = login(&stack, &ann.email, "a-brand-new-password", &[]).await?;
    // The mail came through the mailbox, so the address is verified now.
    let (_, body) = me(&stack, &fresh.token).await?;
    ensure!(body["email_verified"] == true, "{body}");

    // Expired links do nothing.
    forgot(&ann.email).await?;
    let late = sink.wait_for(&ann.email, 3).await?.code()?;
    sqlx::query("UPDATE account_tokens SET expires_at = now() - interval '1 second'").execute(&stack.db.pool).await?;
    let (status, body) = reset(&late, "too-late-password").await?;
    ensure!(status == 404 && body["code"] == "token_invalid", "an expired token worked: {status} {body}");
    login(&stack, &ann.email, "a-brand-new-password", &[]).await?;
    Ok(())
}

/// Identities linked to the account with this email.
async fn identities_of(stack: &Stack, email: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM oauth_identities i JOIN users u ON u.id = i.user_id WHERE lower(u.email) = lower($1)",
    )
    .bind(email)
    .fetch_one(&stack.db.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverified_account_never_gains_the_email_owners_identity() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let provider = FakeProvider::start().await?;
    let stack = stack_with_mail(&sink, Some(&provider), &[]).await?;
    let browser = Browser::new();

    // Mallory registers the victim's address before the victim ever comes, with a password
    // she knows, and signs in.
    let victim = "vera@example.com";
    let (status, _) = register(&stack, victim, "vera", "mallory-knows-this").await?;
    ensure!(status == 202);
    let mallory = login(&stack, victim, "mallory-knows-this", &[]).await?;

    // Vera signs in with her provider, which verified the address: she does not land in
    // Mallory's account, and her identity is linked to nothing.
    provider.log_in_as(profile("vera-sub", "vera", victim, true));
    for provider_name in ["corp", "github"] {
        let landing = browser.login(&stack, provider_name).await?;
        ensure!(
            landing.status == 409 && landing.body["code"] == "account_email_unverified",
            "{provider_name}: {} {}",
            landing.status,
            landing.body
        );
        ensure!(landing.access_token.is_none(), "{provider_name}: a session was started");
    }
    ensure!(identities_of(&stack, victim).await? == 0, "an identity was linked to the unverified account");

    // The verification mail of Mallory's registration reached Vera. Its token verifies only
    // within a session of that account, which Vera does not have: following it as she is
    // verifies nothing (Mallory, who has the session, never sees the token).
    let code = sink.wait_for(victim, 1).await?.code()?;
    let (status, _) = post(&stack, "/v1/auth/email/verify", json!({"token": code})).await?;
    ensure!(status == 401, "verified without a session: {status}");
    let vera_elsewhere = register_and_login(&stack, "vera_other").await?;
    let (status, _) = verify(&stack, &vera_elsewhere, &code).await?;
    ensure!(status == 404, "verified from another account's session: {status}");
    let landing = browser.login(&stack, "corp").await?;
    ensure!(landing.status == 409, "{} {}", landing.status, landing.body);

    // The way out proves the mailbox: a reset, which shuts Mallory out for good.
    let (status, _) = post(&stack, "/v1/auth/password/forgot", json!({"email": victim})).await?;
    ensure!(status == 202);
    let code = sink.wait_for(victim, 2).await?.code()?;
    let (status, body) =
        post(&stack, "/v1/auth/password/reset", json!({"token": code, "password": "vera-own-password"})).await?;
    ensure!(status == 204, "{status} {body}");
    let (status, _) = me(&stack, &mallory.token).await?;
    ensure!(status == 401, "mallory's session survived the reset");
    let (status, _) =
        post(&stack, "/v1/auth/login", json!({"email": victim, "password": "mallory-knows-this"})).await?;
    ensure!(status == 401, "mallory's password survived the reset");
    let landing = browser.login(&stack, "corp").await?;
    ensure!(landing.status == 303, "{} {}", landing.status, landing.body);
    let (_, body) = me(&stack, &landing.access_token.context("session")?).await?;
    ensure!(body["email"] == victim && body["email_verified"] == true, "{body}");
    ensure!(identities_of(&stack, victim).await? == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_account_answers_the_same_whatever_the_password_and_links_nothing() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let provider = FakeProvider::start().await?;
    let stack = stack_with_mail(&sink, Some(&provider), &[]).await?;
    let admin = register_and_login(&stack, "admin").await?;
    stack.promote(&admin).await?;
    let sam = register_and_login(&stack, "sam").await?;
    let code = sink.wait_for(&sam.email, 1).await?.code()?;
    ensure!(verify(&stack, &sam, &code).await?.0 == 204);
    let suspension = stack.url(&format!("/v1/admin/users/{}/suspension", sam.id));
    let (status, body) = json(client().put(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200, "{status} {body}");

    // Item 7: the right password and a wrong one get the same answer.
    let attempt = |password: &str| post(&stack, "/v1/auth/login", json!({"email": sam.email, "password": password}));
    let right = attempt(&sam.password).await?;
    let wrong = attempt("not-sams-password").await?;
    ensure!(right.0 == 403 && right.1["code"] == "account_suspended", "{right:?}");
    ensure!(right == wrong, "the right password answers {right:?}, a wrong one {wrong:?}");

    // Item 10: a suspended account signing in through a provider gets no session, and its
    // identity is not linked (nothing to find once the suspension is lifted).
    provider.log_in_as(profile("sam-sub", "sam", &sam.email, true));
    let landing = Browser::new().login(&stack, "corp").await?;
    ensure!(landing.status == 403 && landing.body["code"] == "account_suspended", "{}", landing.body);
    ensure!(identities_of(&stack, &sam.email).await? == 0, "the suspended account gained an identity");
    // The system account neither.
    provider.log_in_as(profile("sys-sub", "system", "system@waveline.invalid", true));
    let landing = Browser::new().login(&stack, "corp").await?;
    ensure!(landing.status == 403 && landing.access_token.is_none(), "{} {}", landing.status, landing.body);
    ensure!(identities_of(&stack, "system@waveline.invalid").await? == 0, "the system account gained an identity");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_absolute_lifetime_however_often_refreshed() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let stack = stack_with_mail(&sink, None, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    let (status, first) = refresh(&stack, &ann.refresh).await?;
    ensure!(status == 200, "{status} {first}");
    let token = first["refresh_token"].as_str().context("refresh_token")?;
    // The session started 91 days ago (the default lifetime is 90): its fresh token is refused
    // and the session ends, access token included.
    sqlx::query("UPDATE sessions SET created_at = now() - interval '91 days' WHERE user_id = $1::uuid")
        .bind(&ann.id)
        .execute(&stack.db.pool)
        .await?;
    let (status, body) = refresh(&stack, token).await?;
    ensure!(status == 401 && body["code"] == "session_expired", "{status} {body}");
    let (status, _) = me(&stack, &json_token(&first)?).await?;
    ensure!(status == 401, "the session's access token outlived it");
    let (status, body) = refresh(&stack, token).await?;
    ensure!(status == 401 && body["code"] == "session_ended", "{status} {body}");
    // A new login starts a new family.
    let again = login(&stack, &ann.email, &ann.password, &[]).await?;
    ensure!(refresh(&stack, &again.refresh).await?.0 == 200);

    // The lifetime is a setting, and a token never outlives its family.
    let short = stack_with_mail(&sink, None, &[("WAVELINE_REFRESH_FAMILY_MAX_AGE_S", "600")]).await?;
    let bea = register_and_login(&short, "bea").await?;
    let response =
        client().post(short.url("/v1/auth/refresh")).json(&json!({"refresh_token": bea.refresh})).send().await?;
    let cookie = set_cookie(&set_cookies(&response), "waveline_refresh")?;
    let (status, body) = json(response).await?;
    let expires_in = body["refresh_expires_in"].as_u64().context("refresh_expires_in")?;
    ensure!(status == 200 && (590..=600).contains(&expires_in), "{status} {body}");
    let max_age: u64 = cookie
        .split(';')
        .find_map(|a| a.trim().strip_prefix("Max-Age="))
        .and_then(|v| v.parse().ok())
        .context("Max-Age")?;
    ensure!(max_age <= 600, "{cookie}");
    sqlx::query("UPDATE sessions SET created_at = now() - interval '601 seconds'").execute(&short.db.pool).await?;
    let (status, body) = refresh(&short, body["refresh_token"].as_str().context("refresh_token")?).await?;
    ensure!(status == 401 && body["code"] == "session_expired", "{status} {body}");
    Ok(())
}

fn json_token(body: &Value) -> Result<String> {
    body["access_token"].as_str().map(str::to_owned).context("access_token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_smtp_server_slows_no_request() -> Result<()> {
    // A server that takes connections and never says a word: each send waits for lettre's
    // timeout, in the background.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("smtp://{}", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_SMTP_URL", &url)]).await?;
    let started = std::time::Instant::now();
    for n in 0..3 {
        let (status, body) =
            register(&stack, &format!("quiet{n}@example.com"), &format!("quiet{n}"), "quiet-long-password").await?;
        ensure!(status == 202, "{status} {body}");
        let (status, _) =
            post(&stack, "/v1/auth/password/forgot", json!({"email": format!("quiet{n}@example.com")})).await?;
        ensure!(status == 202);
    }
    let took = started.elapsed();
    ensure!(took < std::time::Duration::from_secs(10), "the answers waited for SMTP: {took:?}");
    held.abort();
    Ok(())
}

/// A counter's value in a `/metrics` page (0 while the series does not exist).
async fn metric(base: &str, series: &str) -> Result<f64> {
    let text = client().get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0))
}

const HITS: &str = "waveline_session_cache_total{result=\"hit\"}";
const MISSES: &str = "waveline_session_cache_total{result=\"miss\"}";
const BYPASSES: &str = "waveline_session_cache_total{result=\"bypass\"}";

/// The session cache's bypasses and misses so far.
async fn counts(base: &str) -> Result<(f64, f64)> {
    Ok((metric(base, BYPASSES).await?, metric(base, MISSES).await?))
}

/// `GET {base}{path}` with `token`: the status and body.
async fn get_at(base: &str, path: &str, token: &str) -> Result<(u16, Value)> {
    json(client().get(format!("{base}{path}")).bearer_auth(token).send().await?).await
}

/// Uses `token` on both replicas until each answers it from its session cache.
async fn warm(a: &Stack, b: &Replica, token: &str, path: &str) -> Result<()> {
    for base in [&a.base, &b.base] {
        get_at(base, path, token).await?;
        let hits = metric(base, HITS).await?;
        let (status, body) = get_at(base, path, token).await?;
        ensure!(status == 200, "{base}{path}: {status} {body}");
        let now = metric(base, HITS).await?;
        ensure!(now > hits, "{base} did not answer from its session cache ({hits} then {now} hits)");
    }
    Ok(())
}

/// Polls `GET {base}{path}` with `token` until it answers `status`: within 1 s, or fails.
async fn answers_within_a_second(base: &str, path: &str, token: &str, status: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (got, body) = get_at(base, path, token).await?;
        if got == status {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: {base}{path} still answers {got} {body} after 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_the_other_within_a_second() -> Result<()> {
    let sink = SmtpSink::start().await?;
    let a = stack_with_mail(&sink, None, &[]).await?;
    let b = a.replica().await?;
    let admin = register_and_login(&a, "admin").await?;
    a.promote(&admin).await?;
    let ann = register_and_login(&a, "ann").await?;

    // Logout on A.
    warm(&a, &b, &ann.token, "/v1/me").await?;
    let (status, _) = answer(client().post(a.url("/v1/auth/logout")).bearer_auth(&ann.token)).await?;
    ensure!(status == 204, "logout: {status}");
    ensure!(me(&a, &ann.token).await?.0 == 401, "A still accepts the token it logged out");
    answers_within_a_second(&b.base, "/v1/me", &ann.token, 401, "logout").await?;

    // A suspension through A's admin route; once lifted, the account logs in again.
    let again = login(&a, &ann.email, &ann.password, &[]).await?;
    warm(&a, &b, &again.token, "/v1/me").await?;
    let suspension = a.url(&format!("/v1/admin/users/{}/suspension", ann.id));
    let (status, body) = json(client().put(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200, "suspend: {status} {body}");
    answers_within_a_second(&b.base, "/v1/me", &again.token, 401, "suspension").await?;
    let (status, body) = json(client().delete(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200, "lift: {status} {body}");
    ensure!(get_at(&b.base, "/v1/me", &again.token).await?.0 == 401, "lifting a suspension revived its sessions");

    // A refresh token used twice on A ends the session, newest access token included.
    let third = login(&a, &ann.email, &ann.password, &[]).await?;
    let (status, rotated) = refresh(&a, &third.refresh).await?;
    ensure!(status == 200, "{status} {rotated}");
    let newest = json_token(&rotated)?;
    warm(&a, &b, &newest, "/v1/me").await?;
    let (status, body) = refresh(&a, &third.refresh).await?;
    ensure!(status == 401 && body["code"] == "refresh_reused", "{status} {body}");
    answers_within_a_second(&b.base, "/v1/me", &newest, 401, "refresh-token reuse").await?;

    // A password reset on A ends every session.
    let fourth = login(&a, &ann.email, &ann.password, &[]).await?;
    warm(&a, &b, &fourth.token, "/v1/me").await?;
    post(&a, "/v1/auth/password/forgot", json!({"email": ann.email})).await?;
    let code = sink.wait_for(&ann.email, 2).await?.code()?;
    let (status, body) =
        post(&a, "/v1/auth/password/reset", json!({"token": code, "password": "a-brand-new-password"})).await?;
    ensure!(status == 204, "reset: {status} {body}");
    answers_within_a_second(&b.base, "/v1/me", &fourth.token, 401, "password reset").await?;

    // An operator demotes the admin: B stops letting the session into admin routes.
    warm(&a, &b, &admin.token, "/v1/admin/dead-letters").await?;
    a.cli(&["users", "demote", "admin", "--json"])?;
    answers_within_a_second(&b.base, "/v1/admin/dead-letters", &admin.token, 403, "demotion").await?;
    let (status, body) = get_at(&b.base, "/v1/me", &admin.token).await?;
    ensure!(status == 200 && body["role"] == "user", "{status} {body}");

    // The account is deleted (by an operator, in SQL): its sessions end everywhere.
    warm(&a, &b, &admin.token, "/v1/me").await?;
    sqlx::query("DELETE FROM users WHERE username = 'admin'").execute(&a.db.pool).await?;
    answers_within_a_second(&b.base, "/v1/me", &admin.token, 401, "account deletion").await?;
    answers_within_a_second(&a.base, "/v1/me", &admin.token, 401, "account deletion").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_requests_cost_no_database_read_in_the_steady_state() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    let hits = metric(&stack.base, HITS).await?;
    let misses = metric(&stack.base, MISSES).await?;
    for _ in 0..20 {
        let (status, body) = me(&stack, &ann.token).await?;
        ensure!(status == 200 && body["username"] == "ann", "{status} {body}");
    }
    // The cookie reads the same cache.
    let (status, body) = json(client().get(stack.url("/v1/me")).header("cookie", &ann.cookie).send().await?).await?;
    ensure!(status == 200 && body["username"] == "ann", "{status} {body}");
    let new_misses = metric(&stack.base, MISSES).await? - misses;
    let new_hits = metric(&stack.base, HITS).await? - hits;
    ensure!(new_misses <= 1.0 && new_hits >= 20.0, "21 requests: {new_misses} misses, {new_hits} hits");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_states_the_account_fields_rules_and_requests_that_break_them_answer_400() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let (status, spec) = json(client().get(stack.url("/openapi.json")).send().await?).await?;
    ensure!(status == 200);
    let schemas = &spec["components"]["schemas"];
    let fields = &schemas["Register"]["properties"];
    ensure!(fields["username"]["pattern"] == "^[a-z0-9_-]{3,30}$", "{}", fields["username"]);
    ensure!(fields["username"]["minLength"] == 3 && fields["username"]["maxLength"] == 30);
    ensure!(fields["password"]["minLength"] == 10 && fields["password"]["maxLength"] == 1024);
    for email in [&fields["email"], &schemas["Forgot"]["properties"]["email"]] {
        ensure!(email["maxLength"] == 254 && email["pattern"].is_string(), "{email}");
    }
    ensure!(schemas["Reset"]["properties"]["password"]["minLength"] == 10, "{}", schemas["Reset"]);
    let me_answers = &spec["paths"]["/v1/me"]["get"]["responses"];
    ensure!(me_answers["401"].is_object(), "GET /v1/me documents no 401: {me_answers}");

    let start = spec["paths"]["/v1/auth/oauth/{provider}/start"]["get"]["parameters"]
        .as_array()
        .and_then(|parameters| parameters.iter().find(|parameter| parameter["name"] == "redirect_to"))
        .context("redirect_to")?;
    ensure!(start["schema"]["pattern"].is_string(), "{start}");

    // What the document refuses, the server refuses: 400 `invalid_field`, naming the field.
    for redirect in ["//evil.example/", "/\\evil.example", "https://evil.example/"] {
        let (status, answer) =
            answer(client().get(stack.url("/v1/auth/oauth/corp/start")).query(&[("redirect_to", redirect)])).await?;
        ensure!(status == 400 && answer["code"] == "invalid_field", "{redirect}: {status} {answer}");
        ensure!(answer["message"].as_str().is_some_and(|m| m.contains("redirect_to")), "{answer}");
    }
    let cases = [
        (json!({"email": "", "username": "", "password": ""}), "email"),
        (json!({"email": " ann@example.com", "username": "ann", "password": "long-enough-password"}), "email"),
        (json!({"email": "ann@example", "username": "ann", "password": "long-enough-password"}), "email"),
        (json!({"email": "ann@example.com", "username": "Ann", "password": "long-enough-password"}), "username"),
        (json!({"email": "ann@example.com", "username": "ann", "password": "short"}), "password"),
        // A boolean is not a string, whatever it would read as (poem-openapi names the type
        // it expected for such errors, not the field).
        (json!({"email": "ann@example.com", "username": false, "password": "long-enough-password"}), "string"),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&stack, "/v1/auth/register", body.clone()).await?;
        ensure!(status == 400 && answer["code"] == "invalid_field", "{body}: {status} {answer}");
        ensure!(answer["message"].as_str().is_some_and(|m| m.contains(field)), "{body}: {answer}");
    }
    let (status, answer) = post(&stack, "/v1/auth/password/forgot", json!({"email": "not an address"})).await?;
    ensure!(status == 400 && answer["code"] == "invalid_field", "{status} {answer}");
    let (status, answer) = post(&stack, "/v1/auth/refresh", json!({"refresh_token": 12})).await?;
    ensure!(status == 400 && answer["code"] == "invalid_field", "{status} {answer}");
    // A NUL in a login's email (which PostgreSQL cannot store) is refused, not a 500.
    let (status, answer) =
        post(&stack, "/v1/auth/login", json!({"email": "a\u{0}@example.com", "password": "x"})).await?;
    ensure!(status == 400 && answer["code"] == "invalid_field", "{status} {answer}");
    // And what it allows, it takes: the longest local part and a non-ASCII address.
    let local = "a".repeat(64);
    let (status, answer) = register(&stack, &format!("{local}@exämple.com"), "ann", "long-enough-password").await?;
    ensure!(status == 202, "{status} {answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_while_the_listener_was_deaf_is_refused_once_it_reconnects() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let ann = register_and_login(&stack, "ann").await?;
    let hits = metric(&stack.base, HITS).await?;
    ensure!(me(&stack, &ann.token).await?.0 == 200);
    ensure!(metric(&stack.base, HITS).await? > hits, "the session is not cached");

    // The session ends with no notification (as if it were lost): the cache cannot know.
    let mut tx = stack.db.pool.begin().await?;
    sqlx::query("ALTER TABLE sessions DISABLE TRIGGER sessions_notify").execute(&mut *tx).await?;
    sqlx::query("UPDATE sessions SET ended_at = now(), ended_why = 'logout' WHERE user_id = $1::uuid")
        .bind(&ann.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("ALTER TABLE sessions ENABLE TRIGGER sessions_notify").execute(&mut *tx).await?;
    tx.commit().await?;
    ensure!(me(&stack, &ann.token).await?.0 == 200, "the cache was not consulted");

    // The listener's connection drops: once it listens again, it forgets what it cached.
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&stack.db.pool)
    .await?;
    ensure!(!dropped.is_empty(), "no listening connection found");
    // Until the process notices, it may answer from the cache (a known limit). Once it does,
    // it reads the database (bypassing the cache while deaf); once it listens again, the
    // cache starts empty: no request after the drop is noticed may see the session live.
    let mut noticed = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = counts(&stack.base).await?;
        let (status, body) = me(&stack, &ann.token).await?;
        let after = counts(&stack.base).await?;
        let (bypassed, missed) = (after.0 > before.0, after.1 > before.1);
        noticed |= bypassed || missed;
        ensure!(!noticed || status == 401, "the ended session works after the drop was noticed: {status} {body}");
        if noticed && !bypassed {
            break;
        }
        ensure!(Instant::now() < deadline, "no reconnect within 5 s: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And it listens again: a logout elsewhere is heard.
    let again = login(&stack, &ann.email, &ann.password, &[]).await?;
    ensure!(me(&stack, &again.token).await?.0 == 200);
    let hits = metric(&stack.base, HITS).await?;
    ensure!(me(&stack, &again.token).await?.0 == 200);
    ensure!(metric(&stack.base, HITS).await? > hits, "the cache is not used after the reconnect");
    sqlx::query("UPDATE sessions SET ended_at = now() WHERE user_id = $1::uuid AND ended_at IS NULL")
        .bind(&ann.id)
        .execute(&stack.db.pool)
        .await?;
    answers_within_a_second(&stack.base, "/v1/me", &again.token, 401, "an end heard after the reconnect").await?;
    Ok(())
}
