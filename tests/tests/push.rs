//! Push notifications end to end: devices registered over HTTP, pushes enqueued through
//! `Push::enqueue` (what the rest of Waveline calls), published by the outbox relay and sent
//! by the real worker (`waveline worker`, or `serve --workers`) to a fake FCM and token
//! endpoint (`waveline_tests::fake_fcm`) that checks the assertion's signature with the test
//! key. Every wait is for something observable (a request reaching the fake, a counter of the
//! worker), with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_shared::config::Settings;
use waveline_shared::domain::UserId;
use waveline_shared::push::{Push, PushMessage};
use waveline_tests::fake_fcm::{Answer, CLIENT_EMAIL, FakeFcm, KEY_ID, PROJECT_ID, ServiceAccount};
use waveline_tests::stack::{Mode, Stack, User, register_and_login};
use waveline_tests::{TestDb, temp_dir, waveline_bin};

/// The settings that point Waveline at the fake.
fn push_env(fcm: &FakeFcm, account: &ServiceAccount) -> Vec<(String, String)> {
    vec![
        ("WAVELINE_FCM_CREDENTIALS_FILE".into(), account.key_file.display().to_string()),
        ("WAVELINE_FCM_BASE_URL".into(), fcm.base.clone()),
        ("WAVELINE_SOCIAL_WRITES_PER_MINUTE".into(), "0".into()),
    ]
}

/// The `Push` of a process configured with `env`, as `serve` builds it.
fn push_switch(env: &[(String, String)]) -> Result<Push> {
    let env: BTreeMap<String, String> = env.iter().cloned().collect();
    Ok(Push::from_settings(&Settings::from_sources(None, &env)?))
}

async fn put_device(stack: &Stack, user: &User, token: &str, platform: &str) -> Result<(u16, String)> {
    let response = reqwest::Client::new()
        .put(stack.url(&format!("/v1/me/devices/{token}")))
        .bearer_auth(&user.token)
        .json(&json!({ "platform": platform }))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn delete_device(stack: &Stack, user: &User, token: &str) -> Result<u16> {
    let response = reqwest::Client::new()
        .delete(stack.url(&format!("/v1/me/devices/{token}")))
        .bearer_auth(&user.token)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The device tokens of `user`, as stored.
async fn devices_of(stack: &Stack, user: &User) -> Result<BTreeSet<String>> {
    let id: UserId = user.id.parse()?;
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT token FROM devices WHERE user_id = $1").bind(id).fetch_all(&stack.db.pool).await?;
    Ok(rows.into_iter().map(|(token,)| token).collect())
}

fn message(title: &str) -> Result<PushMessage> {
    let data = BTreeMap::from([("kind".to_owned(), "message".to_owned()), ("thread".to_owned(), "42".to_owned())]);
    Ok(PushMessage::new(title, "You have a new message", data)?)
}

fn expected_body(device: &str, title: &str) -> Value {
    json!({"message": {
        "token": device,
        "notification": {"title": title, "body": "You have a new message"},
        "data": {"kind": "message", "thread": "42"},
    }})
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_every_device_once_with_one_access_token() -> Result<()> {
    waveline_tests::init_logging();
    let fcm = FakeFcm::start().await?;
    let dir = temp_dir()?;
    let account = fcm.service_account(dir.path())?;
    let env = push_env(&fcm, &account);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start(Mode::Distributed, true, &extra).await?;
    let push = push_switch(&env)?;
    ensure!(push.is_on());

    let ada = register_and_login(&stack, "ada").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let (phone, browser) = ("fMEP0vJqS0:APA91bH-ada_phone", "ada-browser_token:2");
    for (token, platform) in [(phone, "android"), (browser, "web")] {
        let (status, body) = put_device(&stack, &ada, token, platform).await?;
        ensure!(status == 204 && body.is_empty(), "{status} {body}");
    }
    // Again: idempotent.
    ensure!(put_device(&stack, &ada, phone, "android").await?.0 == 204);
    // Refused before anything is stored, naming the field.
    for (token, platform, field) in
        [("has.dot", "android", "token"), (&*"a".repeat(4097), "android", "token"), (phone, "symbian", "body")]
    {
        let (status, body) = put_device(&stack, &ada, token, platform).await?;
        let body: Value = serde_json::from_str(&body)?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
        ensure!(body["message"].as_str().is_some_and(|m| m.starts_with(field)), "{body}");
    }
    // Someone else's token: a delete changes nothing, and says nothing.
    ensure!(delete_device(&stack, &bob, browser).await? == 204);
    ensure!(devices_of(&stack, &ada).await? == BTreeSet::from([phone.to_owned(), browser.to_owned()]));

    // Three pushes for Ada; none for Bob, who has no device (nor with pushes off).
    let titles = ["First", "Second", "Third"];
    for title in titles {
        ensure!(push.enqueue(&stack.db.pool, ada.id.parse()?, &message(title)?).await?, "{title} not enqueued");
    }
    ensure!(!push.enqueue(&stack.db.pool, bob.id.parse()?, &message("None")?).await?);
    ensure!(!Push::OFF.enqueue(&stack.db.pool, ada.id.parse()?, &message("Off")?).await?);

    let sends = fcm.wait_for("six sends", |seen| (seen.sends.len() >= 6).then(|| seen.sends.clone())).await?;
    let (token_requests, issued) = fcm.seen(|seen| (seen.token_requests.clone(), seen.issued.clone()));

    // One access token for all of them, got with a well-formed, well-signed assertion.
    ensure!(token_requests.len() == 1 && issued.len() == 1, "{} token requests", token_requests.len());
    let request = &token_requests[0];
    ensure!(request.grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer" && request.signature_valid);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[fcm.token_uri()]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let assertion = jsonwebtoken::decode::<Value>(
        &request.assertion,
        &jsonwebtoken::DecodingKey::from_rsa_der(&account.public_key_der),
        &validation,
    )
    .context("the assertion's signature or claims")?;
    ensure!(assertion.header.kid.as_deref() == Some(KEY_ID), "{:?}", assertion.header);
    let claims = &assertion.claims;
    ensure!(claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging", "{claims}");
    let (iat, exp) = (claims["iat"].as_u64().context("iat")?, claims["exp"].as_u64().context("exp")?);
    ensure!(iat.abs_diff(now_s()) < 120 && exp > iat && exp - iat <= 3600, "{claims}");

    // Each push to each device exactly once, with that token and the exact message.
    let mut got = BTreeSet::new();
    for send in &sends {
        ensure!(send.path == format!("/v1/projects/{PROJECT_ID}/messages:send"), "{}", send.path);
        ensure!(send.authorization == format!("Bearer {}", issued[0]), "{}", send.authorization);
        let title = send.body["message"]["notification"]["title"].as_str().context("title")?;
        ensure!(send.body == expected_body(&send.device, title), "{}", send.body);
        ensure!(got.insert((send.device.clone(), title.to_owned())), "sent twice: {} {title}", send.device);
    }
    let want: BTreeSet<(String, String)> = [phone, browser]
        .iter()
        .flat_map(|device| titles.iter().map(move |title| ((*device).to_owned(), (*title).to_owned())))
        .collect();
    ensure!(got == want, "{got:?}");

    // The install signs in as Bob: the token moves, and Ada's pushes no longer reach it.
    ensure!(put_device(&stack, &bob, browser, "web").await?.0 == 204);
    ensure!(devices_of(&stack, &ada).await? == BTreeSet::from([phone.to_owned()]));
    ensure!(devices_of(&stack, &bob).await? == BTreeSet::from([browser.to_owned()]));
    ensure!(delete_device(&stack, &ada, phone).await? == 204);
    ensure!(devices_of(&stack, &ada).await?.is_empty());
    Ok(())
}

/// A counter of the serving process's `/metrics`, 0 when absent.
async fn counter(stack: &Stack, name: &str, result: &str) -> Result<u64> {
    let text = reqwest::get(stack.url("/metrics")).await?.text().await?;
    let prefix = format!("{name}{{result=\"{result}\"}} ");
    Ok(text.lines().find_map(|line| line.strip_prefix(&prefix)).map_or(Ok(0), str::parse)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_answers_decide_between_retrying_forgetting_and_giving_up() -> Result<()> {
    waveline_tests::init_logging();
    let fcm = FakeFcm::start().await?;
    let dir = temp_dir()?;
    let account = fcm.service_account(dir.path())?;
    let mut env = push_env(&fcm, &account);
    // The backoff alone would bring the retry back after 250 ms; FCM asks for a second.
    env.push(("WAVELINE_JOB_RETRY_BASE_MS".into(), "250".into()));
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start(Mode::Embedded, true, &extra).await?;
    let push = push_switch(&env)?;

    let cy = register_and_login(&stack, "cyril").await?;
    let (busy, gone, invalid, fine, foreign) = ("busy-1", "gone-2", "invalid-3", "fine-4", "foreign-5");
    for token in [busy, gone, invalid, fine, foreign] {
        ensure!(put_device(&stack, &cy, token, "ios").await?.0 == 204, "{token}");
    }
    fcm.script(busy, &[Answer::Unavailable { retry_after_s: 1 }]);
    fcm.script(gone, &[Answer::Unregistered]);
    fcm.script(invalid, &[Answer::InvalidToken]);
    fcm.script(foreign, &[Answer::SenderMismatch]);
    ensure!(push.enqueue(&stack.db.pool, cy.id.parse()?, &message("Hello")?).await?);

    // The job ends once: one retry, then done.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counter(&stack, "waveline_jobs_total", "done").await? < 1 {
        ensure!(std::time::Instant::now() < deadline, "the push job did not finish within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(counter(&stack, "waveline_jobs_total", "retried").await? == 1);
    ensure!(counter(&stack, "waveline_jobs_total", "done").await? == 1);

    let (sends, token_requests) = fcm.seen(|seen| {
        let by_device: BTreeMap<String, Vec<_>> = [busy, gone, invalid, fine, foreign]
            .iter()
            .map(|device| ((*device).to_owned(), seen.sends_to(device).into_iter().cloned().collect()))
            .collect();
        (by_device, seen.token_requests.len())
    });
    // 503 with Retry-After: 1, then sent, no sooner than asked; only that device again.
    let answers: Vec<&Answer> = sends[busy].iter().map(|send| &send.answer).collect();
    ensure!(answers == [&Answer::Unavailable { retry_after_s: 1 }, &Answer::Sent], "{answers:?}");
    let waited = sends[busy][1].at.duration_since(sends[busy][0].at);
    ensure!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    for device in [gone, invalid, fine, foreign] {
        ensure!(sends[device].len() == 1, "{device}: {} sends", sends[device].len());
    }
    ensure!(sends[busy][1].body == expected_body(busy, "Hello"));
    ensure!(token_requests == 1, "{token_requests} token requests");

    // Tokens FCM no longer knows are forgotten; a refusal for another reason keeps the device.
    let left = devices_of(&stack, &cy).await?;
    ensure!(left == BTreeSet::from([busy.to_owned(), fine.to_owned(), foreign.to_owned()]), "{left:?}");
    for (result, count) in [("sent", 2), ("retried", 1), ("token_removed", 2), ("rejected", 1)] {
        let got = counter(&stack, "waveline_push_sent_total", result).await?;
        ensure!(got == count, "waveline_push_sent_total{{result={result}}}: {got}, expected {count}");
    }

    // An account keeps its 20 most recently registered devices.
    let dee = register_and_login(&stack, "deena").await?;
    for n in 0..21 {
        ensure!(put_device(&stack, &dee, &format!("dee-{n:02}"), "android").await?.0 == 204);
    }
    let kept = devices_of(&stack, &dee).await?;
    ensure!(kept.len() == 20 && !kept.contains("dee-00") && kept.contains("dee-20"), "{kept:?}");
    // Registering again makes a device the most recent: now dee-01 goes, not dee-02.
    ensure!(put_device(&stack, &dee, "dee-02", "android").await?.0 == 204);
    ensure!(put_device(&stack, &dee, "dee-21", "android").await?.0 == 204);
    let kept = devices_of(&stack, &dee).await?;
    ensure!(kept.len() == 20 && !kept.contains("dee-01") && kept.contains("dee-02"), "{kept:?}");
    Ok(())
}

fn waveline(args: &[&str], env: &[(String, String)]) -> Result<std::process::Output> {
    let mut command = Command::new(waveline_bin());
    command.args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(command.output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_gets_an_access_token_and_a_bad_key_file_stops_the_start() -> Result<()> {
    let fcm = FakeFcm::start().await?;
    let dir = temp_dir()?;
    let account = fcm.service_account(dir.path())?;
    let db = TestDb::new().await?;
    let mut env = push_env(&fcm, &account);
    env.push(("WAVELINE_DATABASE_URL".into(), db.url.clone()));
    env.push(("WAVELINE_STORAGE".into(), format!("file://{}/objects", dir.path().display())));

    let checked = waveline(&["check", "--json"], &env)?;
    let report: Value = serde_json::from_slice(&checked.stdout)?;
    ensure!(checked.status.success() && report["ok"] == true, "{report}");
    let probe = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "push")).context("push")?;
    ensure!(probe["detail"] == format!("an access token for project {PROJECT_ID}"), "{probe}");
    ensure!(fcm.seen(|seen| seen.issued.len()) == 1);

    // A key file without its key: `check` says so, and a worker does not start.
    let mut key: Value = serde_json::from_slice(&std::fs::read(&account.key_file)?)?;
    key.as_object_mut().context("object")?.remove("private_key");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, key.to_string())?;
    let mut env = env.clone();
    env.push(("WAVELINE_FCM_CREDENTIALS_FILE".into(), broken.display().to_string()));
    let checked = waveline(&["check", "--json"], &env)?;
    let report: Value = serde_json::from_slice(&checked.stdout)?;
    let probe = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "push")).context("push")?;
    ensure!(checked.status.code() == Some(1) && probe["ok"] == false, "{report}");
    let detail = probe["detail"].as_str().unwrap_or_default();
    ensure!(detail.contains(&broken.display().to_string()) && detail.ends_with("`private_key` is missing"), "{detail}");

    let worker = waveline(&["worker"], &env)?;
    let stderr = String::from_utf8_lossy(&worker.stderr);
    ensure!(!worker.status.success(), "the worker started: {stderr}");
    ensure!(stderr.contains("fcm_credentials_malformed") && stderr.contains("`private_key` is missing"), "{stderr}");
    Ok(())
}

/// A notification for an account with no live socket becomes a push to its devices; with a
/// socket open, it arrives there instead, and nothing is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_offline_accounts_as_pushes() -> Result<()> {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    waveline_tests::init_logging();
    let fcm = FakeFcm::start().await?;
    let dir = temp_dir()?;
    let account = fcm.service_account(dir.path())?;
    let env = push_env(&fcm, &account);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start(Mode::Embedded, true, &extra).await?;
    let ada = register_and_login(&stack, "ada").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let cy = register_and_login(&stack, "cyrus").await?;
    let phone = "ada-phone_1";
    ensure!(put_device(&stack, &ada, phone, "ios").await?.0 == 204);

    // Ada has no socket: Bob's follow is pushed.
    let status =
        reqwest::Client::new().put(stack.url("/v1/me/followings/ada")).bearer_auth(&bob.token).send().await?.status();
    ensure!(status == 204, "{status}");
    let sent = fcm.wait_for("the follow's push", |seen| seen.sends_to(phone).first().map(|s| s.body.clone())).await?;
    let message = &sent["message"];
    ensure!(message["notification"]["title"] == "New follower", "{sent}");
    ensure!(message["notification"]["body"] == "bob followed you", "{sent}");
    ensure!(message["data"]["type"] == "follow" && message["data"]["notification_id"].is_string(), "{sent}");

    // With a socket open, Cyrus's follow arrives there, and is not pushed.
    let url = format!("{}/v1/ws", stack.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", ada.token).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let status =
        reqwest::Client::new().put(stack.url("/v1/me/followings/ada")).bearer_auth(&cy.token).send().await?.status();
    ensure!(status == 204, "{status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next()).await.context("no notification frame")?;
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = frame else { continue };
        let frame: Value = serde_json::from_str(&text)?;
        if frame["type"] == "notification" {
            ensure!(frame["notification"]["actor"]["username"] == "cyrus", "{frame}");
            break;
        }
    }
    // The push decision precedes the live delivery: the outbox shows it.
    let pushes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE payload->>'kind' = 'push' AND payload->>'user_id' = $1")
            .bind(&ada.id)
            .fetch_one(&stack.db.pool)
            .await?;
    ensure!(pushes == 1, "{pushes} pushes queued for Ada");
    Ok(())
}
