//! Accounts, over real HTTP against `waveline serve`: suspended accounts and the absolute
//! lifetime of a session.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_tests::oauth_provider::{Browser, FakeProvider, profile};
use waveline_tests::stack::{Mode, Stack, json, login, register_and_login, set_cookie, set_cookies};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// A stack that knows `provider`, when given.
async fn stack_with(provider: Option<&FakeProvider>, extra: &[(&str, &str)]) -> Result<Stack> {
    let mut env: Vec<(String, String)> = provider.map(FakeProvider::env).unwrap_or_default();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Stack::start(Mode::Embedded, false, &env).await
}

async fn post(stack: &Stack, path: &str, body: Value) -> Result<(u16, Value)> {
    let response = client().post(stack.url(path)).json(&body).send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
}

async fn me(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    json(client().get(stack.url("/v1/me")).bearer_auth(token).send().await?).await
}

async fn refresh(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    post(stack, "/v1/auth/refresh", json!({"refresh_token": token})).await
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
async fn a_suspended_account_answers_the_same_whatever_the_password_and_links_nothing() -> Result<()> {
    let provider = FakeProvider::start().await?;
    let stack = stack_with(Some(&provider), &[]).await?;
    let admin = register_and_login(&stack, "admin").await?;
    stack.cli(&["users", "promote", "admin", "--json"])?;
    let sam = register_and_login(&stack, "sam").await?;
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
    let stack = stack_with(None, &[]).await?;
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
    let short = stack_with(None, &[("WAVELINE_REFRESH_FAMILY_MAX_AGE_S", "600")]).await?;
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
