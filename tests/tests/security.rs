//! Security tests that try to break in, over real HTTP against `waveline serve`: forged and
//! stale tokens, refresh-token theft, cross-site writes, brute force, hostile text, and the
//! headers every answer must carry.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::Digest as _;
use waveline_tests::oauth_provider::{Browser, profile};
use waveline_tests::stack::{JWT_SECRET, Mode, Stack, header, json, login, register_and_login, upload};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// The JSON header of a token.
fn token_header(token: &str) -> Result<Value> {
    let head = token.split('.').next().context("a JWT")?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head)?)?)
}

/// A token with these claims, signed with `secret` under `kid`.
fn forge(claims: &Value, secret: &[u8], kid: &str, alg: jsonwebtoken::Algorithm) -> Result<String> {
    let header = jsonwebtoken::Header { kid: Some(kid.to_owned()), ..jsonwebtoken::Header::new(alg) };
    Ok(jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_secret(secret))?)
}

async fn me(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    json(client().get(stack.url("/v1/me")).bearer_auth(token).send().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_orphaned_tokens_get_401() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let (status, _) = me(&stack, &alice.token).await?;
    ensure!(status == 200);

    let kid = token_header(&alice.token)?["kid"].as_str().context("kid")?.to_owned();
    let payload = alice.token.split('.').nth(1).context("payload")?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
    let now = claims["iat"].as_i64().context("iat")?;
    let with = |changes: Value| {
        let mut claims = claims.clone();
        for (key, value) in changes.as_object().into_iter().flatten() {
            claims[key] = value.clone();
        }
        claims
    };
    let secret = JWT_SECRET.as_bytes();
    let hs256 = jsonwebtoken::Algorithm::HS256;

    // Sanity: our forger makes tokens the server accepts when nothing is wrong.
    let (status, body) = me(&stack, &forge(&claims, secret, &kid, hs256)?).await?;
    ensure!(status == 200, "the forger itself is broken: {status} {body}");

    let header_none = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string());
    let header_rs256 = URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string());
    let body_of = |claims: &Value| URL_SAFE_NO_PAD.encode(claims.to_string());
    // HS/RS confusion: an RS256 header over an HMAC made with the shared secret.
    let confused = {
        let signing_input = format!("{header_rs256}.{}", body_of(&claims));
        let signature = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(secret),
            hs256,
        )?;
        format!("{signing_input}.{signature}")
    };
    let mut tampered = alice.token.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    let escalated = format!(
        "{}.{}.{}",
        alice.token.split('.').next().context("header")?,
        body_of(&with(json!({"sub": uuid::Uuid::new_v4()}))),
        alice.token.split('.').nth(2).context("signature")?
    );
    let cases: Vec<(&str, String)> = vec![
        ("alg none", format!("{header_none}.{}.", body_of(&claims))),
        ("HS/RS confusion", confused),
        (
            "expired",
            forge(&with(json!({"exp": now - 3600, "nbf": now - 7200, "iat": now - 7200})), secret, &kid, hs256)?,
        ),
        ("not yet valid", forge(&with(json!({"nbf": now + 3600})), secret, &kid, hs256)?),
        ("wrong audience", forge(&with(json!({"aud": "another-api"})), secret, &kid, hs256)?),
        ("wrong issuer", forge(&with(json!({"iss": "someone-else"})), secret, &kid, hs256)?),
        ("no exp", {
            let mut claims = claims.clone();
            claims.as_object_mut().context("object")?.remove("exp");
            forge(&claims, secret, &kid, hs256)?
        }),
        ("forged signature", forge(&claims, b"not-the-secret-not-the-secret-000", &kid, hs256)?),
        ("tampered signature", tampered),
        ("claims changed under the old signature", escalated),
        ("unknown kid", forge(&claims, secret, "0123456789abcdef", hs256)?),
        ("HS512 with the right secret", forge(&claims, secret, &kid, jsonwebtoken::Algorithm::HS512)?),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in &cases {
        let (status, body) = me(&stack, token).await?;
        ensure!(status == 401 && body["code"] == "unauthorized", "{name}: {status} {body}");
    }

    // A token for an account that no longer exists.
    let bob = register_and_login(&stack, "bob").await?;
    sqlx::query("DELETE FROM users WHERE username = 'bob'").execute(&stack.db.pool).await?;
    // The API learns of it by notification, within a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let (status, body) = me(&stack, &bob.token).await?;
        if status == 401 {
            ensure!(body["code"] == "unauthorized", "deleted user: {status} {body}");
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "deleted user still accepted after 1 s: {status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn refresh(stack: &Stack, token: &str) -> Result<(u16, Value)> {
    json(client().post(stack.url("/v1/auth/refresh")).json(&json!({"refresh_token": token})).send().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_rotate_and_a_reused_one_ends_the_session() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;

    // Each refresh returns a new pair, in the same session.
    let (status, first) = refresh(&stack, &alice.refresh).await?;
    ensure!(status == 200 && first["refresh_token"] != alice.refresh.as_str(), "{status} {first}");
    let second_refresh = first["refresh_token"].as_str().context("refresh_token")?.to_owned();
    let second_access = first["access_token"].as_str().context("access_token")?.to_owned();
    ensure!(me(&stack, &second_access).await?.0 == 200);
    ensure!(first["csrf_token"] == alice.csrf.as_str(), "the session (and its CSRF token) changed: {first}");

    // The stolen first token, replayed: refused, and the whole family is revoked.
    let (status, body) = refresh(&stack, &alice.refresh).await?;
    ensure!(status == 401 && body["code"] == "refresh_reused", "{status} {body}");
    let (status, body) = refresh(&stack, &second_refresh).await?;
    ensure!(status == 401 && body["code"] == "session_ended", "the newer token survived reuse: {status} {body}");
    for token in [&alice.token, &second_access] {
        let (status, body) = me(&stack, token).await?;
        ensure!(status == 401, "an access token of the revoked session still works: {body}");
    }

    // Unknown and malformed tokens.
    let (status, body) = refresh(&stack, "bm90LWEtdG9rZW4").await?;
    ensure!(status == 401 && body["code"] == "unauthorized", "{status} {body}");
    let (status, body) = refresh(&stack, &"x".repeat(129)).await?;
    ensure!(status == 400, "an oversized token: {status} {body}");

    // By cookie: `{}` and the refresh cookie, same-origin or a configured origin only.
    let carol = login(&stack, &alice.email, &alice.password, &[]).await?;
    let cookie = format!("waveline_refresh={}", carol.refresh);
    let (status, body) = json(
        client()
            .post(stack.url("/v1/auth/refresh"))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .json(&json!({}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 403 && body["code"] == "origin_refused", "{status} {body}");
    let response =
        client().post(stack.url("/v1/auth/refresh")).header("cookie", &cookie).json(&json!({})).send().await?;
    ensure!(header(&response, "cache-control") == "no-store");
    let (status, body) = json(response).await?;
    ensure!(status == 200 && body["access_token"].is_string(), "{status} {body}");

    // Logging out ends the session: its refresh token is dead too.
    let fresh = body["refresh_token"].as_str().context("refresh_token")?.to_owned();
    let access = body["access_token"].as_str().context("access_token")?.to_owned();
    let response = client().post(stack.url("/v1/auth/logout")).bearer_auth(&access).send().await?;
    ensure!(response.status() == 204);
    let (status, body) = refresh(&stack, &fresh).await?;
    ensure!(status == 401 && body["code"] == "session_ended", "{status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_writes_need_the_csrf_token_and_bearer_writes_do_not() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let (status, track) = upload(&stack, &alice, &[("title", "Night Drive")], ("a.wav", &audio_bytes())).await?;
    ensure!(status == 202, "{status} {track}");
    let url = stack.url(&format!("/v1/tracks/{}", track["id"].as_str().context("id")?));
    let patch = |csrf: Option<&str>| {
        let mut request = client().patch(&url).header("cookie", &alice.cookie).json(&json!({"title": "Renamed"}));
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        request
    };
    for (name, csrf) in [("none", None), ("wrong", Some("AAAA")), ("another session's", Some(bob.csrf.as_str()))] {
        let (status, body) = json(patch(csrf).send().await?).await?;
        ensure!(status == 403 && body["code"] == "csrf_failed", "{name} CSRF token: {status} {body}");
    }
    let (status, body) = json(patch(Some(&alice.csrf)).send().await?).await?;
    ensure!(status == 200 && body["title"] == "Renamed", "{status} {body}");
    // Reads by cookie need no token; writes by bearer need none either.
    let (status, _) = json(client().get(&url).header("cookie", &alice.cookie).send().await?).await?;
    ensure!(status == 200);
    let (status, body) =
        json(client().patch(&url).bearer_auth(&alice.token).json(&json!({"title": "Bearer"})).send().await?).await?;
    ensure!(status == 200 && body["title"] == "Bearer", "{status} {body}");
    Ok(())
}

/// A short WAV: the API sniffs it as audio (nothing here is processed).
fn audio_bytes() -> Vec<u8> {
    let data = vec![0u8; 4410 * 4];
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    for (value, width) in [(16u32, 4), (1, 2), (2, 2), (44100, 4), (176_400, 4), (4, 2), (16, 2)] {
        wav.extend_from_slice(&value.to_le_bytes()[..width]);
    }
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    wav
}

async fn try_login(stack: &Stack, email: &str, password: &str, from: &str) -> Result<(u16, Value, String)> {
    let response = client()
        .post(stack.url("/v1/auth/login"))
        .header("x-forwarded-for", from)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?;
    let retry_after = header(&response, "retry-after");
    let (status, body) = json(response).await?;
    Ok((status, body, retry_after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_meets_the_address_limit_then_the_account_lockout() -> Result<()> {
    let stack = Stack::start(
        Mode::Embedded,
        false,
        &[
            ("WAVELINE_TRUSTED_PROXIES", "127.0.0.1"),
            ("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "8"),
            ("WAVELINE_LOGIN_DELAY_AFTER", "3"),
            ("WAVELINE_LOGIN_LOCKOUT_AFTER", "5"),
            ("WAVELINE_LOGIN_LOCKOUT_S", "60"),
        ],
    )
    .await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;

    // One address guessing many accounts runs into its limit: 429 with Retry-After.
    let mut limited = None;
    for attempt in 0..12 {
        let (status, body, retry_after) =
            try_login(&stack, &format!("nobody{attempt}@example.com"), "wrong-password", "198.51.100.1").await?;
        if status == 429 {
            ensure!(body["code"] == "rate_limited", "{body}");
            limited = Some((attempt, retry_after));
            break;
        }
        ensure!(status == 401 && body["code"] == "invalid_credentials", "{status} {body}");
    }
    let (attempt, retry_after) = limited.context("twelve logins a minute from one address were never limited")?;
    ensure!(attempt <= 8, "the limit of 8 let {attempt} through");
    ensure!(retry_after.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s)), "Retry-After: {retry_after:?}");
    // Another address is not affected.
    let (status, body, _) = try_login(&stack, &bob.email, &bob.password, "198.51.100.2").await?;
    ensure!(status == 200, "a valid login from another address: {status} {body}");

    // One account guessed from many addresses: growing delays, then a lockout.
    let mut address = 10;
    let mut next = || {
        address += 1;
        format!("203.0.113.{address}")
    };
    for failure in 1..=3 {
        let (status, body, _) = try_login(&stack, &alice.email, "wrong-password", &next()).await?;
        ensure!(status == 401, "failure {failure}: {status} {body}");
    }
    let (status, body, retry_after) = try_login(&stack, &alice.email, "wrong-password", &next()).await?;
    ensure!(status == 429 && body["code"] == "login_throttled" && retry_after == "1", "{status} {body} {retry_after}");
    // Even the right password waits its turn.
    let (status, body, _) = try_login(&stack, &alice.email, &alice.password, &next()).await?;
    ensure!(status == 429 && body["code"] == "login_throttled", "{status} {body}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = try_login(&stack, &alice.email, "wrong-password", &next()).await?;
    ensure!(status == 401, "the fourth failure");
    let (status, body, retry_after) = try_login(&stack, &alice.email, "wrong-password", &next()).await?;
    ensure!(status == 429 && retry_after == "2", "the delay doubles: {status} {body} {retry_after}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, _) = try_login(&stack, &alice.email, "wrong-password", &next()).await?;
    ensure!(status == 401, "the fifth failure");
    let (status, body, retry_after) = try_login(&stack, &alice.email, &alice.password, &next()).await?;
    ensure!(
        status == 429 && body["code"] == "account_locked" && retry_after.parse::<u64>().is_ok_and(|s| s > 50),
        "locked: {status} {body} {retry_after}"
    );
    // Unknown emails are throttled the same way, so the answers reveal no accounts.
    for _ in 0..3 {
        try_login(&stack, "ghost@example.com", "wrong-password", &next()).await?;
    }
    let (status, body, _) = try_login(&stack, "ghost@example.com", "wrong-password", &next()).await?;
    ensure!(status == 429 && body["code"] == "login_throttled", "{status} {body}");

    // An address outside the trusted proxies cannot choose its own: the peer (127.0.0.1) is
    // trusted here, so a forged chain counts only its right-most hop.
    let (status, _, _) = try_login(&stack, &bob.email, &bob.password, "198.51.100.1, 198.51.100.3").await?;
    ensure!(status == 200, "the right-most untrusted hop is the client");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_the_security_headers() -> Result<()> {
    let stack = Stack::start(
        Mode::Embedded,
        false,
        &[("WAVELINE_HSTS_MAX_AGE_S", "31536000"), ("WAVELINE_CORS_ORIGINS", "https://app.example.com")],
    )
    .await?;
    let alice = register_and_login(&stack, "alice").await?;
    let (_, track) = upload(&stack, &alice, &[("title", "x")], ("a.wav", &audio_bytes())).await?;
    let id = track["id"].as_str().context("id")?;
    let stream = stack.url(&format!("/v1/tracks/{id}/stream/mp3_128"));
    let requests: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("health", client().get(stack.url("/healthz")), 200),
        ("json", client().get(stack.url("/v1/me")).bearer_auth(&alice.token), 200),
        ("openapi", client().get(stack.url("/openapi.json")), 200),
        ("unknown route", client().get(stack.url("/nope")), 404),
        ("unauthenticated", client().get(stack.url("/v1/me")), 401),
        (
            "malformed json",
            client().post(stack.url("/v1/auth/login")).header("content-type", "application/json").body("{"),
            400,
        ),
        ("not ready stream", client().get(&stream), 409),
        (
            "login",
            client().post(stack.url("/v1/auth/login")).json(&json!({"email": alice.email, "password": alice.password})),
            200,
        ),
    ];
    for (name, request, expected) in requests {
        let response = request.send().await?;
        ensure!(response.status() == expected, "{name}: {}", response.status());
        let cookies = waveline_tests::stack::set_cookies(&response);
        for (header_name, value) in [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("strict-transport-security", "max-age=31536000; includeSubDomains"),
        ] {
            ensure!(
                header(&response, header_name) == value,
                "{name}: {header_name} is {:?}",
                header(&response, header_name)
            );
        }
        let csp = header(&response, "content-security-policy");
        ensure!(csp.starts_with("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{name}: {csp}");
        let corp = header(&response, "cross-origin-resource-policy");
        let expected_corp = if name == "not ready stream" { "cross-origin" } else { "same-origin" };
        ensure!(corp == expected_corp, "{name}: CORP {corp}");
        ensure!(!header(&response, "x-request-id").is_empty(), "{name}: no request id");
        for cookie in &cookies {
            ensure!(cookie.contains("Secure") && cookie.contains("SameSite="), "{name}: {cookie}");
        }
    }

    // Swagger UI runs only its own scripts: the policy names their hashes.
    let response = client().get(stack.url("/docs")).send().await?;
    let csp = header(&response, "content-security-policy");
    let html = response.text().await?;
    let script_src = csp.split(';').find(|d| d.trim().starts_with("script-src")).context("script-src")?;
    ensure!(!script_src.contains("unsafe"), "{script_src}");
    let mut rest = html.as_str();
    let mut scripts = 0;
    while let Some(start) = rest.find("<script") {
        let after = &rest[start..];
        let body_start = after.find('>').context("tag end")? + 1;
        let end = after[body_start..].find("</script>").context("script end")?;
        let hash = STANDARD.encode(sha2::Sha256::digest(&after.as_bytes()[body_start..body_start + end]));
        ensure!(
            script_src.contains(&format!("'sha256-{hash}'")),
            "an inline script of /docs is not allowed by {script_src}"
        );
        scripts += 1;
        rest = &after[body_start + end..];
    }
    ensure!(scripts >= 2, "Swagger UI has its bundle and its start-up script inline");

    // CORS: the configured origin, with credentials; others get nothing, but may read the
    // listening routes without credentials.
    let response = client()
        .get(stack.url("/v1/me"))
        .bearer_auth(&alice.token)
        .header("origin", "https://app.example.com")
        .send()
        .await?;
    ensure!(header(&response, "access-control-allow-origin") == "https://app.example.com");
    ensure!(header(&response, "access-control-allow-credentials") == "true");
    ensure!(header(&response, "vary").to_lowercase().contains("origin"));
    let response = client()
        .get(stack.url("/v1/me"))
        .bearer_auth(&alice.token)
        .header("origin", "https://evil.example")
        .send()
        .await?;
    ensure!(response.status() == 200 && header(&response, "access-control-allow-origin").is_empty());
    let response = client().get(&stream).header("origin", "https://player.example").send().await?;
    ensure!(
        header(&response, "access-control-allow-origin") == "*"
            && header(&response, "access-control-allow-credentials").is_empty()
    );
    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, stack.url("/v1/me"))
            .header("origin", origin)
            .header("access-control-request-method", "PATCH")
            .header("access-control-request-headers", "x-csrf-token, content-type")
    };
    let response = preflight("https://app.example.com").send().await?;
    ensure!(response.status() == 204, "{}", response.status());
    ensure!(header(&response, "access-control-allow-methods").contains("PATCH"));
    ensure!(header(&response, "access-control-allow-headers").contains("x-csrf-token"));
    let response = preflight("https://evil.example").send().await?;
    ensure!(
        header(&response, "access-control-allow-origin").is_empty(),
        "a preflight from an unknown origin was allowed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_stored_verbatim_and_harms_nothing() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let hostile = [
        "'; DROP TABLE tracks; --",
        "\" OR 1=1 --",
        "{\"$gt\": \"\"}",
        "{\"$where\": \"sleep(1000)\"}",
        "../../../../etc/passwd",
        "..\\..\\windows\\system32",
        "<script>alert(1)</script>",
        "%00%2e%2e%2f",
        "𝄞🎵 Ünïcödé ☃ 中文 עברית",
    ];
    for text in hostile {
        // Tags are comma-separated in a form; none of these texts has a comma.
        let (status, track) = upload(
            &stack,
            &alice,
            &[("title", text), ("description", text), ("genre", text), ("tags", text)],
            ("../../etc/passwd; rm -rf /.wav", &audio_bytes()),
        )
        .await?;
        ensure!(status == 202, "{text}: {status} {track}");
        let id = track["id"].as_str().context("id")?;
        let (status, stored) =
            json(client().get(stack.url(&format!("/v1/tracks/{id}"))).bearer_auth(&alice.token).send().await?).await?;
        ensure!(status == 200, "{status} {stored}");
        for field in ["title", "description", "genre"] {
            ensure!(stored[field] == text, "{field} changed: {text:?} became {}", stored[field]);
        }
        ensure!(stored["tags"] == json!([text]), "{}", stored["tags"]);
    }
    // The tracks table is still there, with every row.
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks WHERE owner_id = $1::uuid")
        .bind(&alice.id)
        .fetch_one(&stack.db.pool)
        .await?;
    ensure!(count == hostile.len() as i64, "{count}");
    // Oversized unicode is refused with a code; the limit counts characters, not bytes.
    let long = "🎵".repeat(201);
    let (status, body) = upload(&stack, &alice, &[("title", &long)], ("a.wav", &audio_bytes())).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let exactly = "🎵".repeat(200);
    let (status, body) = upload(&stack, &alice, &[("title", &exactly)], ("a.wav", &audio_bytes())).await?;
    ensure!(status == 202 && body["title"] == exactly.as_str(), "{status}");
    // Hostile ids in paths are unknown tracks, never files.
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "1%20OR%201%3D1",
        "%7B%22%24gt%22%3A%22%22%7D",
        "00000000-0000-0000-0000-000000000000",
    ] {
        let (status, body) =
            json(client().get(stack.url(&format!("/v1/tracks/{id}"))).bearer_auth(&alice.token).send().await?).await?;
        ensure!(status == 404 && body["code"] == "not_found", "{id}: {status} {body}");
    }
    // Hostile account fields are refused by their formats, or stored verbatim where free.
    let (status, body) = json(
        client()
            .post(stack.url("/v1/auth/register"))
            .json(&json!({"email": "x@example.com", "username": "'; DROP TABLE users; --", "password": "long-enough-password"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let (status, body) = json(
        client()
            .post(stack.url("/v1/auth/login"))
            .json(&json!({"email": {"$gt": ""}, "password": {"$gt": ""}}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 400, "a NoSQL operator as an email: {status} {body}");
    let user_count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE role <> 'system'").fetch_one(&stack.db.pool).await?;
    ensure!(user_count == 1, "{user_count}");
    // Mass assignment: fields the API does not take are refused, not ignored.
    let (status, body) = json(
        client()
            .post(stack.url("/v1/auth/register"))
            .json(&json!({"email": "m@example.com", "username": "mallory", "password": "long-enough-password", "role": "admin"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 400, "register with a role: {status} {body}");
    let (_, any) = upload(&stack, &alice, &[("title", "mine")], ("a.wav", &audio_bytes())).await?;
    let url = stack.url(&format!("/v1/tracks/{}", any["id"].as_str().context("id")?));
    for extra in
        [json!({"owner_id": uuid::Uuid::new_v4()}), json!({"state": "ready"}), json!({"title": "x", "revision": 9})]
    {
        let (status, body) = json(client().patch(&url).bearer_auth(&alice.token).json(&extra).send().await?).await?;
        ensure!(status == 400, "PATCH {extra}: {status} {body}");
    }
    // Queries are bounded too.
    for query in [
        "limit=0",
        "limit=101",
        "limit=-1",
        &format!("owner={}", "a".repeat(31)),
        &format!("cursor={}", "1".repeat(65)),
    ] {
        let (status, body) = json(client().get(stack.url(&format!("/v1/tracks?{query}"))).send().await?).await?;
        ensure!(status == 400 && body["code"].is_string(), "?{query}: {status} {body}");
    }
    Ok(())
}

async fn get(url: &str, range: Option<&str>) -> Result<reqwest::Response> {
    let mut request = client().get(url);
    if let Some(range) = range {
        request = request.header("range", range);
    }
    Ok(request.send().await?)
}

/// `url` with its signature (the path segment after `/v1/signed/{expires}/`) changed.
fn tamper_signature(url: &str) -> Result<String> {
    let parts: Vec<&str> = url.split('/').collect();
    let at = parts.iter().position(|p| *p == "signed").context("a signed URL")? + 2;
    let mut parts: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    let first = parts[at].chars().next().context("signature")?;
    parts[at].replace_range(0..first.len_utf8(), if first == 'A' { "B" } else { "A" });
    Ok(parts.join("/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_tracks_share_links_signed_urls_and_suspension() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, &[("WAVELINE_SIGNED_URL_TTL_S", "3")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let admin = register_and_login(&stack, "admin").await?;
    stack.promote(&admin).await?;
    let dir = waveline_tests::temp_dir()?;
    let song = dir.path().join("song.wav");
    waveline_tests::audio::tone(&song, 3.0, 44100, 2, &[])?;
    let (status, track) = upload(
        &stack,
        &alice,
        &[("title", "Unreleased"), ("visibility", "private")],
        ("song.wav", &std::fs::read(&song)?),
    )
    .await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    waveline_tests::stack::wait_ready(&stack, &alice, &id, 1).await?;
    let track_url = stack.url(&format!("/v1/tracks/{id}"));
    let urls_url = format!("{track_url}/signed-urls");

    // Invisible to others: 404, exactly like a track that does not exist.
    for (who, request) in [
        ("bob", client().get(&track_url).bearer_auth(&bob.token)),
        ("bob's signed URLs", client().get(&urls_url).bearer_auth(&bob.token)),
        ("anonymous stream", client().get(format!("{track_url}/stream/mp3_128"))),
        ("anonymous HLS", client().get(format!("{track_url}/hls/master.m3u8"))),
    ] {
        let (status, body) = json(request.send().await?).await?;
        ensure!(status == 404 && body["code"] == "not_found", "{who}: {status} {body}");
    }

    // Signed URLs play without a session.
    let (status, signed) = json(client().get(&urls_url).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 200 && signed["expires_in"] == 3, "{status} {signed}");
    let mp3 = stack.url(signed["stream_urls"]["mp3_128"].as_str().context("mp3 URL")?);
    let response = get(&mp3, Some("bytes=0-99")).await?;
    ensure!(response.status() == 206, "{}", response.status());
    let cache = header(&response, "cache-control");
    ensure!(cache.starts_with("public, max-age=") && cache[16..].parse::<u64>().is_ok_and(|s| s <= 3), "{cache}");
    let signed_bytes = response.bytes().await?;
    let own = client()
        .get(format!("{track_url}/stream/mp3_128"))
        .bearer_auth(&alice.token)
        .header("range", "bytes=0-99")
        .send()
        .await?;
    ensure!(own.bytes().await? == signed_bytes, "the signed stream differs from the owner's");
    // HLS: the master's relative URIs resolve under the signature, down to a segment.
    let master = url::Url::parse(&stack.url(signed["hls_master_url"].as_str().context("HLS URL")?))?;
    let response = get(master.as_str(), None).await?;
    ensure!(response.status() == 200, "master: {}", response.status());
    let text = response.text().await?;
    let variant =
        master.join(text.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).context("a variant")?)?;
    let response = get(variant.as_str(), None).await?;
    ensure!(response.status() == 200, "{variant}: {}", response.status());
    let text = response.text().await?;
    let segment =
        variant.join(text.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).context("a segment")?)?;
    let response = get(segment.as_str(), None).await?;
    ensure!(response.status() == 200 && !response.bytes().await?.is_empty(), "{segment}");
    let waveform = stack.url(signed["waveform_url"].as_str().context("waveform URL")?);
    let (status, body) = json(get(&waveform, None).await?).await?;
    ensure!(status == 200 && body["data"].is_array(), "{status}");

    // Tampered: the signature, the expiry, another preset, another track.
    let segments: Vec<&str> = mp3.split('/').collect();
    let at = segments.iter().position(|p| *p == "signed").context("signed")? + 1;
    let later = segments[at].parse::<i64>()? + 3600;
    let mut longer = segments.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    longer[at] = later.to_string();
    let other_preset = mp3.replace("/stream/mp3_128", "/stream/opus_64");
    let (_, other) = upload(&stack, &alice, &[("title", "other")], ("song.wav", &std::fs::read(&song)?)).await?;
    let other_track = mp3.replace(&id, other["id"].as_str().context("id")?);
    for (name, url) in [
        ("signature", tamper_signature(&mp3)?),
        ("expiry", longer.join("/")),
        ("preset", other_preset),
        ("track", other_track),
        (
            "HLS signature on a stream",
            mp3.replace(&format!("/tracks/{id}/stream/mp3_128"), &format!("/tracks/{id}/hls/master.m3u8")),
        ),
    ] {
        let (status, body) = json(get(&url, None).await?).await?;
        ensure!(status == 403 && body["code"] == "bad_signature", "tampered {name}: {status} {body}");
    }

    // A share link lets bob in; replacing or revoking it shuts him out.
    let (status, share) =
        json(client().put(format!("{track_url}/share")).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 201, "{status} {share}");
    let secret = share["secret"].as_str().context("secret")?.to_owned();
    let (status, seen) =
        json(client().get(stack.url(share["url"].as_str().context("url")?)).bearer_auth(&bob.token).send().await?)
            .await?;
    ensure!(status == 200 && seen["title"] == "Unreleased", "{status} {seen}");
    let (status, bob_urls) =
        json(client().get(stack.url(share["signed_urls"].as_str().context("signed_urls")?)).send().await?).await?;
    ensure!(status == 200, "anonymous with the secret: {status} {bob_urls}");
    let bob_mp3 = stack.url(bob_urls["stream_urls"]["mp3_128"].as_str().context("mp3")?);
    ensure!(get(&bob_mp3, Some("bytes=0-9")).await?.status() == 206);
    let (status, _) = json(client().get(format!("{track_url}?secret=wrong-{secret}")).send().await?).await?;
    ensure!(status == 404, "a wrong secret");
    let (status, _) = json(client().put(format!("{track_url}/share")).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 404, "bob made a share link for alice's private track");
    let (_, replaced) =
        json(client().put(format!("{track_url}/share")).bearer_auth(&alice.token).send().await?).await?;
    let (status, _) = json(client().get(format!("{track_url}?secret={secret}")).send().await?).await?;
    ensure!(status == 404, "the replaced secret still works");
    let response = client().delete(format!("{track_url}/share")).bearer_auth(&alice.token).send().await?;
    ensure!(response.status() == 204);
    let (status, _) =
        json(client().get(format!("{track_url}?secret={}", replaced["secret"].as_str().unwrap_or(""))).send().await?)
            .await?;
    ensure!(status == 404, "the revoked secret still works");

    // Signed URLs expire.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let (status, body) = json(get(&mp3, None).await?).await?;
    ensure!(status == 403 && body["code"] == "url_expired", "{status} {body}");

    // Admin routes are for admins.
    let dead = stack.url("/v1/admin/dead-letters");
    let (status, body) = json(client().get(&dead).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200 && body["dead_letters"].is_array(), "{status} {body}");
    let (status, body) = json(client().get(&dead).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 403 && body["code"] == "admin_only", "{status} {body}");
    let (status, _) = json(client().get(&dead).send().await?).await?;
    ensure!(status == 401);
    let suspension = stack.url(&format!("/v1/admin/users/{}/suspension", alice.id));
    let (status, body) = json(client().put(&suspension).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 403 && body["code"] == "admin_only", "{status} {body}");

    // Suspension: sessions end, logins fail, private tracks stop playing (but for admins).
    let (status, _) = json(client().get(&urls_url).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 200);
    let (_, fresh) = json(client().get(&urls_url).bearer_auth(&alice.token).send().await?).await?;
    let fresh_mp3 = stack.url(fresh["stream_urls"]["mp3_128"].as_str().context("mp3")?);
    let (status, body) = json(client().put(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200 && body["suspended_at"].is_string(), "{status} {body}");
    let (status, _) = me(&stack, &alice.token).await?;
    ensure!(status == 401, "a suspended account's token still works");
    let (status, body) = refresh(&stack, &alice.refresh).await?;
    ensure!(status == 401, "a suspended account refreshed: {body}");
    let response = client()
        .post(stack.url("/v1/auth/login"))
        .json(&json!({"email": alice.email, "password": alice.password}))
        .send()
        .await?;
    let (status, body) = json(response).await?;
    ensure!(status == 403 && body["code"] == "account_suspended", "{status} {body}");
    tokio::time::sleep(Duration::from_millis(2100)).await; // the lookup cache's lifetime
    let (status, body) = json(get(&fresh_mp3, None).await?).await?;
    ensure!(status == 404, "a suspended owner's private track still plays by signed URL: {status} {body}");
    let response = client()
        .get(format!("{track_url}/stream/mp3_128"))
        .bearer_auth(&admin.token)
        .header("range", "bytes=0-9")
        .send()
        .await?;
    ensure!(response.status() == 206, "an admin cannot play it: {}", response.status());
    let (status, body) = json(client().delete(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200 && body["suspended_at"].is_null(), "{status} {body}");
    login(&stack, &alice.email, &alice.password, &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_quota_are_refused_or_fail_with_their_original_deleted() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, &[("WAVELINE_FREE_QUOTA_S", "5")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let dir = waveline_tests::temp_dir()?;
    let tone = |name: &str, seconds: f64| -> Result<Vec<u8>> {
        let path = dir.path().join(name);
        waveline_tests::audio::tone(&path, seconds, 44100, 2, &[])?;
        Ok(std::fs::read(&path)?)
    };
    let status_of = |id: String| {
        let (stack, alice) = (&stack, &alice);
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (_, body) = json(
                    client()
                        .get(stack.url(&format!("/v1/tracks/{id}/status")))
                        .bearer_auth(&alice.token)
                        .send()
                        .await?,
                )
                .await?;
                if body["state"] == "ready" || body["state"] == "failed" {
                    return Ok::<Value, anyhow::Error>(body);
                }
                ensure!(std::time::Instant::now() < deadline, "{body}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // 3 s of a 5 s quota: fine.
    let (status, first) = upload(&stack, &alice, &[("title", "one")], ("one.wav", &tone("one.wav", 3.0)?)).await?;
    ensure!(status == 202, "{status} {first}");
    let body = status_of(first["id"].as_str().context("id")?.to_owned()).await?;
    ensure!(body["state"] == "ready", "{body}");
    // 3 s more would make 6: accepted (the duration is unknown up front), then failed by the
    // worker, with its original gone.
    let (status, second) = upload(&stack, &alice, &[("title", "two")], ("two.wav", &tone("two.wav", 3.0)?)).await?;
    ensure!(status == 202, "{status} {second}");
    let second_id = second["id"].as_str().context("id")?.to_owned();
    let body = status_of(second_id.clone()).await?;
    ensure!(body["state"] == "failed" && body["error"]["code"] == "quota_exceeded", "{body}");
    let left = stack.storage.list_prefix(waveline_shared::storage::original_key(second_id.parse()?).as_str()).await?;
    ensure!(left.is_empty(), "the refused track's original is still stored: {left:?}");
    // 2 s fits exactly.
    let (_, third) = upload(&stack, &alice, &[("title", "three")], ("three.wav", &tone("three.wav", 2.0)?)).await?;
    let body = status_of(third["id"].as_str().context("id")?.to_owned()).await?;
    ensure!(body["state"] == "ready", "{body}");
    // Now the quota is used up: refused up front, in both upload flows.
    let (status, body) = upload(&stack, &alice, &[("title", "four")], ("four.wav", &tone("four.wav", 1.0)?)).await?;
    ensure!(status == 403 && body["code"] == "quota_exceeded", "{status} {body}");
    let (status, body) = json(
        client()
            .post(stack.url("/v1/uploads"))
            .bearer_auth(&alice.token)
            .json(&json!({"filename": "x.wav"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 403 && body["code"] == "quota_exceeded", "{status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_logins_create_link_and_refuse_forged_or_replayed_callbacks() -> Result<()> {
    let provider = waveline_tests::oauth_provider::FakeProvider::start().await?;
    let sink = waveline_tests::smtp_sink::SmtpSink::start().await?;
    let mut env = provider.env();
    env.push(("WAVELINE_SMTP_URL".into(), sink.url()));
    // Many logins from one address: the per-address limit is not what this test is about.
    env.push(("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE".into(), "0".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start(Mode::Embedded, false, &env).await?;
    let browser = Browser::new();

    // OIDC: a new verified identity creates an account, and comes back to it next time.
    provider.log_in_as(profile("oidc-1", "Night.Owl", "owl@example.com", true));
    let (authorize, _) = browser.start(&stack, "corp", "/welcome").await?;
    let url = url::Url::parse(&authorize)?;
    let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    ensure!(query.get("code_challenge_method").map(String::as_str) == Some("S256"), "{authorize}");
    ensure!(query.get("code_challenge").is_some_and(|c| c.len() == 43), "{authorize}");
    ensure!(query.get("state").is_some_and(|s| s.len() >= 32), "{authorize}");
    ensure!(
        query.get("redirect_uri").map(String::as_str) == Some(stack.url("/v1/auth/oauth/corp/callback").as_str()),
        "{authorize}"
    );
    let landing = browser.login(&stack, "corp").await?;
    ensure!(
        landing.status == 303 && landing.location == "/welcome",
        "{} {} {}",
        landing.status,
        landing.location,
        landing.body
    );
    let token = landing.access_token.context("no session cookie after the callback")?;
    let (status, me_body) = me(&stack, &token).await?;
    ensure!(status == 200 && me_body["email"] == "owl@example.com" && me_body["username"] == "night-owl", "{me_body}");
    let again = browser.login(&stack, "corp").await?;
    let (_, again_me) = me(&stack, &again.access_token.context("session")?).await?;
    ensure!(again_me["id"] == me_body["id"], "the same identity made a second account");

    ensure!(me_body["email_verified"] == true, "the provider verified it: {me_body}");

    // An email the provider has not verified links nothing. One it has verified links to the
    // password account with that email only once the account has verified it too.
    let linda = register_and_login(&stack, "linda").await?;
    provider.log_in_as(profile("oidc-2", "linda-sso", &linda.email, false));
    let landing = browser.login(&stack, "corp").await?;
    ensure!(landing.status == 403 && landing.body["code"] == "oauth_email_unverified", "{}", landing.body);
    provider.log_in_as(profile("oidc-2", "linda-sso", &linda.email, true));
    let landing = browser.login(&stack, "corp").await?;
    ensure!(
        landing.status == 409 && landing.body["code"] == "account_email_unverified" && landing.access_token.is_none(),
        "{} {}",
        landing.status,
        landing.body
    );
    let code = sink.wait_for(&linda.email, 1).await?.code()?;
    let response = client()
        .post(stack.url("/v1/auth/email/verify"))
        .bearer_auth(&linda.token)
        .json(&json!({"token": code}))
        .send()
        .await?;
    ensure!(response.status() == 204, "verify: {}", response.status());
    let landing = browser.login(&stack, "corp").await?;
    let (_, linked) = me(&stack, &landing.access_token.context("session")?).await?;
    ensure!(linked["id"] == linda.id.as_str(), "not linked by verified email: {linked}");

    // GitHub's dialect: the verified primary email from /user/emails.
    provider.log_in_as(profile("4242", "octocat", "octo@example.com", true));
    let landing = browser.login(&stack, "github").await?;
    let (_, octo) = me(&stack, &landing.access_token.context("session")?).await?;
    ensure!(octo["username"] == "octocat" && octo["email"] == "octo@example.com", "{octo}");

    // Forged and replayed callbacks.
    provider.log_in_as(profile("oidc-3", "mallory", "mallory@example.com", true));
    let (authorize_a, cookie_a) = browser.start(&stack, "corp", "/").await?;
    let (authorize_b, cookie_b) = browser.start(&stack, "corp", "/").await?;
    let callback_a = browser.consent(&authorize_a).await?;
    let callback_b = browser.consent(&authorize_b).await?;
    // The state does not match the browser's cookie (a login started elsewhere), or there is
    // no cookie at all.
    let landing = browser.land(&callback_a, Some(&cookie_b)).await?;
    ensure!(landing.status == 400 && landing.body["code"] == "oauth_state_mismatch", "{}", landing.body);
    let landing = browser.land(&callback_a, None).await?;
    ensure!(landing.status == 400 && landing.body["code"] == "oauth_state_mismatch", "{}", landing.body);
    // A code issued for flow A, brought back under flow B's state: B's PKCE verifier does not
    // match A's challenge, so the provider refuses it.
    let code_a = url::Url::parse(&callback_a)?.query_pairs().find(|(k, _)| k == "code").context("code")?.1.into_owned();
    let mut swapped = url::Url::parse(&callback_b)?;
    let state_b = swapped.query_pairs().find(|(k, _)| k == "state").context("state")?.1.into_owned();
    swapped.query_pairs_mut().clear().append_pair("code", &code_a).append_pair("state", &state_b);
    let landing = browser.land(swapped.as_str(), Some(&cookie_b)).await?;
    ensure!(landing.status == 400 && landing.body["code"] == "oauth_code_rejected", "{}", landing.body);
    // Flow A done properly works once; replaying its callback does not.
    let landing = browser.land(&callback_a, Some(&cookie_a)).await?;
    ensure!(
        landing.status == 400 && landing.body["code"] == "oauth_code_rejected",
        "the code was spent: {}",
        landing.body
    );
    let (authorize_c, cookie_c) = browser.start(&stack, "corp", "/").await?;
    let callback_c = browser.consent(&authorize_c).await?;
    let landing = browser.land(&callback_c, Some(&cookie_c)).await?;
    ensure!(landing.status == 303, "{}", landing.body);
    let landing = browser.land(&callback_c, Some(&cookie_c)).await?;
    ensure!(landing.status == 400 && landing.body["code"] == "oauth_state_invalid", "replayed: {}", landing.body);
    // The provider enforces PKCE: a code redeemed without a verifier is refused.
    let (authorize_d, _) = browser.start(&stack, "corp", "/").await?;
    let callback_d = browser.consent(&authorize_d).await?;
    let code_d = url::Url::parse(&callback_d)?.query_pairs().find(|(k, _)| k == "code").context("code")?.1.into_owned();
    let response = client()
        .post(format!("{}/token", provider.base))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code_d.as_str()),
            ("redirect_uri", stack.url("/v1/auth/oauth/corp/callback").as_str()),
            ("client_id", waveline_tests::oauth_provider::CLIENT_ID),
            ("client_secret", waveline_tests::oauth_provider::CLIENT_SECRET),
        ])
        .send()
        .await?;
    ensure!(response.status() == 400, "a code without its PKCE verifier was redeemed");

    // Unknown providers, open redirects, and a provider's refusal.
    let response = browser.http.get(stack.url("/v1/auth/oauth/nope/start")).send().await?;
    ensure!(response.status() == 404);
    for target in ["https://evil.example", "//evil.example", "/%5Cevil.example"] {
        let response =
            browser.http.get(stack.url(&format!("/v1/auth/oauth/corp/start?redirect_to={target}"))).send().await?;
        let (status, body) = json(response).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "redirect_to={target}: {status} {body}");
    }
    let landing =
        browser.land(&stack.url("/v1/auth/oauth/corp/callback?error=access_denied&state=x"), Some(&cookie_a)).await?;
    ensure!(landing.status == 400 && landing.body["code"] == "oauth_denied", "{}", landing.body);
    Ok(())
}
