//! What a client can make the server hold, over real HTTP against `waveline serve`: request
//! bodies, metrics series, event streams, and the headers a shared cache relies on.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waveline_tests::audio::{sine_s16, wav_header};
use waveline_tests::stack::{Mode, Stack, User, header, json, register_and_login, upload};

/// A raw connection to the stack (what an attacker's client does, byte by byte).
async fn connect(stack: &Stack) -> Result<TcpStream> {
    Ok(TcpStream::connect(stack.base.trim_start_matches("http://")).await?)
}

/// Reads one HTTP/1.1 answer whose head says `Connection: close` or gives a length: status
/// and body.
async fn read_answer(stream: &mut TcpStream) -> Result<(u16, String)> {
    let mut answer = Vec::new();
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|value| value.parse::<usize>().ok());
            if read == 0 || length.is_some_and(|length| body.len() >= length) {
                let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).context("a status line")?;
                return Ok((status, body.to_owned()));
            }
        }
        ensure!(read > 0, "the connection closed without an answer: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_bounded_while_they_are_read() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_BODY_READ_TIMEOUT_S", "1")]).await?;

    // A declared length over the limit is refused before a byte of the body is sent.
    let mut stream = connect(&stack).await?;
    stream
        .write_all(b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 419430400\r\n\r\n")
        .await?;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream)).await??;
    ensure!(status == 413 && body.contains("\"too_large\""), "{status} {body}");

    // A chunked body is refused once it passes the limit, while the client is still
    // sending: the server reads about 64 KiB of it, not the 400 MiB on offer.
    let mut stream = connect(&stack).await?;
    stream
        .write_all(b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
        let mut sent = 0u64;
        while sent < 400 << 20 {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 64 * 1024;
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
        sent
    });
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut answer)).await??;
    let head = String::from_utf8_lossy(&answer[..read]).to_string();
    ensure!(head.starts_with("HTTP/1.1 413"), "not refused while sending: {head}");
    ensure!(head.contains("too_large"), "{head}");
    drop(reader);
    let sent = sender.await?;
    // What the sender managed before the server closed: the limit plus what the kernels'
    // socket buffers took, far from the whole.
    ensure!(sent < 64 << 20, "the server kept reading: {sent} bytes went through");

    // Under the limit, the handler sees the body as usual: bad JSON is a 400, not a 413.
    let response = reqwest::Client::new()
        .post(stack.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(format!("{{\"email\": \"{}\"", "a".repeat(60 * 1024)))
        .send()
        .await?;
    let (status, body) = json(response).await?;
    ensure!(status == 400, "{status} {body}");

    // A body that stops arriving is cut off after the read timeout (1 s here).
    let mut stream = connect(&stack).await?;
    stream
        .write_all(b"POST /v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"email\"")
        .await?;
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream)).await??;
    ensure!(status == 408 && body.contains("\"body_timeout\""), "{status} {body}");
    ensure!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_a_setting() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_JSON_BODY_MAX_BYTES", "2048")]).await?;
    let client = reqwest::Client::new();
    let small = format!("{{\"email\": \"a@example.com\", \"password\": \"{}\"}}", "p".repeat(1500));
    let (status, body) = json(
        client.post(stack.url("/v1/auth/login")).header("content-type", "application/json").body(small).send().await?,
    )
    .await?;
    ensure!(status == 401, "{status} {body}");
    let large = format!("{{\"email\": \"a@example.com\", \"password\": \"{}\"}}", "p".repeat(3000));
    let (status, body) = json(
        client.post(stack.url("/v1/auth/login")).header("content-type", "application/json").body(large).send().await?,
    )
    .await?;
    ensure!(status == 413 && body["code"] == "too_large", "{status} {body}");
    Ok(())
}

/// The `waveline_http_requests_total` series the process exposes (names and labels).
async fn http_series(stack: &Stack) -> Result<Vec<String>> {
    let text = reqwest::get(stack.url("/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("waveline_http_requests_total{"))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _value)| series.to_owned()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_labels_come_from_a_closed_set() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_RATE_LIMIT_PER_MINUTE", "0")]).await?;
    let client = reqwest::Client::new();
    let path_for = |n: u64| match n % 4 {
        0 => format!("/v1/tracks/{}/status", uuid::Uuid::new_v4()),
        1 => format!("/v1/signed/{}/{}/tracks/{}/waveform", 1_700_000_000 + n, uuid::Uuid::new_v4(), n),
        2 => format!("/no/such/path/{n}"),
        _ => format!("/v1/tracks/{n}/stream/mp3_128"),
    };
    // One of each kind first, so the series they make exist before counting.
    for n in 1000..1004 {
        client.get(stack.url(&path_for(n))).send().await?;
    }
    client.request(reqwest::Method::from_bytes(b"BREW")?, stack.url("/healthz")).send().await?;
    reqwest::get(stack.url("/metrics")).await?;
    let before = http_series(&stack).await?;

    for n in 0..1000 {
        let path = path_for(n);
        let response = client.get(stack.url(&path)).send().await?;
        ensure!(response.status() != 500, "{path}: {}", response.status());
    }
    for method in ["BREW", "PROPFIND", "XYZZY", "M1", "M2"] {
        client.request(reqwest::Method::from_bytes(method.as_bytes())?, stack.url("/healthz")).send().await?;
    }
    let after = http_series(&stack).await?;
    let new: Vec<&String> = after.iter().filter(|series| !before.contains(series)).collect();
    ensure!(new.is_empty(), "{} new series after 1000 distinct paths: {new:#?}", new.len());
    ensure!(
        !after.iter().any(|series| series.contains("no/such") || series.contains("1700000") || series.contains("BREW")),
        "a raw path or method became a label: {after:#?}"
    );
    Ok(())
}

/// The owner makes track `id` private.
async fn make_private(stack: &Stack, owner: &User, id: &str) -> Result<()> {
    let response = reqwest::Client::new()
        .patch(stack.url(&format!("/v1/tracks/{id}")))
        .bearer_auth(&owner.token)
        .json(&serde_json::json!({"visibility": "private"}))
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    Ok(())
}

/// A few seconds of quiet audio as WAV.
fn wav() -> Vec<u8> {
    let samples = sine_s16(8000 * 2, 1, 8000, 0.3, 0);
    let mut file = wav_header(1, 1, 8000, 16, samples.len() as u32);
    file.extend_from_slice(&samples);
    file
}

/// Opens the event stream of `track` as `forwarded_for` (through the trusted proxy 127.0.0.1).
async fn open_stream(stack: &Stack, track: &str, forwarded_for: &str) -> Result<reqwest::Response> {
    Ok(reqwest::Client::new()
        .get(stack.url(&format!("/v1/tracks/{track}/events")))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await?)
}

/// The value of one series of `/metrics` (0 when absent).
async fn metric(stack: &Stack, series: &str) -> Result<f64> {
    let text = reqwest::get(stack.url("/metrics")).await?.text().await?;
    Ok(text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_and_quiet_ones_cost_no_query() -> Result<()> {
    // Nothing processes uploads here, so the track stays `queued` and its streams stay open.
    let stack = Stack::start(
        Mode::Embedded,
        false,
        &[
            ("WAVELINE_EVENT_STREAMS_MAX", "3"),
            ("WAVELINE_EVENT_STREAMS_PER_CLIENT", "2"),
            ("WAVELINE_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await?;
    let alice = register_and_login(&stack, "alice").await?;
    let (status, track) = upload(&stack, &alice, &[("title", "Open")], ("open.wav", &wav())).await?;
    ensure!(status == 202, "{status} {track}");
    let track = track["id"].as_str().context("id")?.to_owned();

    let first = open_stream(&stack, &track, "198.51.100.1").await?;
    let second = open_stream(&stack, &track, "198.51.100.1").await?;
    ensure!(first.status() == 200 && second.status() == 200);
    let refused = open_stream(&stack, &track, "198.51.100.1").await?;
    let retry_after = header(&refused, "retry-after");
    let (status, body) = json(refused).await?;
    ensure!(status == 429 && body["code"] == "too_many_streams" && !retry_after.is_empty(), "{status} {body}");

    // Another client may open one (the process then holds three); a fourth client may not.
    let third = open_stream(&stack, &track, "198.51.100.2").await?;
    ensure!(third.status() == 200);
    let (status, body) = json(open_stream(&stack, &track, "198.51.100.3").await?).await?;
    ensure!(status == 429 && body["code"] == "too_many_streams", "{status} {body}");

    // Quiet streams read their track after 5 s of silence, from the status cache: one
    // database read for the three of them, then hits.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hits = metric(&stack, "waveline_status_cache_total{result=\"hit\"}").await?;
        if hits >= 4.0 {
            break;
        }
        ensure!(Instant::now() < deadline, "no cache hits after 30 s ({hits})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let misses = metric(&stack, "waveline_status_cache_total{result=\"miss\"}").await?;
    ensure!(misses == 1.0, "{misses} database reads for one quiet track");

    // A closed stream frees its place at once.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = open_stream(&stack, &track, "198.51.100.3").await?;
        if again.status() == 200 {
            break;
        }
        ensure!(Instant::now() < deadline, "the closed stream's place never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((second, third));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_varies_by_origin() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let id = uuid::Uuid::new_v4();
    for path in [
        "/healthz".to_owned(),
        format!("/v1/tracks/{id}/stream/mp3_128"),
        format!("/v1/signed/1700000000/sig/tracks/{id}/waveform"),
        "/v1/nothing".to_owned(),
    ] {
        // No `Origin`: a CDN may cache this answer, and must know that it varies.
        let response = reqwest::get(stack.url(&path)).await?;
        ensure!(header(&response, "vary").to_lowercase().contains("origin"), "{path}: no Vary: Origin");
    }
    // Signed URLs are listening routes too: players on other sites may load them.
    let response = reqwest::get(stack.url(&format!("/v1/signed/1700000000/sig/tracks/{id}/waveform"))).await?;
    ensure!(header(&response, "cross-origin-resource-policy") == "cross-origin");
    let body: Value = response.json().await?;
    ensure!(body["code"].is_string(), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_polls_come_from_the_cache_and_follow_every_change() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let (status, track) = upload(&stack, &alice, &[("title", "Polled")], ("polled.wav", &wav())).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    let client = reqwest::Client::new();
    let poll = |token: String| {
        let (client, url) = (client.clone(), stack.url(&format!("/v1/tracks/{id}/status")));
        async move { json(client.get(url).bearer_auth(token).send().await?).await }
    };

    let hits = metric(&stack, "waveline_status_cache_total{result=\"hit\"}").await?;
    let misses = metric(&stack, "waveline_status_cache_total{result=\"miss\"}").await?;
    for _ in 0..20 {
        let (status, body) = poll(bob.token.clone()).await?;
        ensure!(status == 200 && body["state"] == "queued", "{status} {body}");
    }
    let new_misses = metric(&stack, "waveline_status_cache_total{result=\"miss\"}").await? - misses;
    let new_hits = metric(&stack, "waveline_status_cache_total{result=\"hit\"}").await? - hits;
    ensure!(new_misses <= 1.0 && new_hits >= 19.0, "20 polls: {new_misses} misses, {new_hits} hits");

    // The owner makes it private: the very next poll on this replica sees it (the process
    // drops the track from its cache when it changes it), and others get 404.
    make_private(&stack, &alice, &id).await?;
    let (status, body) = poll(bob.token.clone()).await?;
    ensure!(status == 404, "still visible to others after going private: {status} {body}");
    let (status, body) = poll(alice.token.clone()).await?;
    ensure!(status == 200 && body["state"] == "queued", "{status} {body}");

    // Deleted: gone for its owner too.
    let response = client.delete(stack.url(&format!("/v1/tracks/{id}"))).bearer_auth(&alice.token).send().await?;
    ensure!(response.status() == 204, "{}", response.status());
    let (status, body) = poll(alice.token.clone()).await?;
    ensure!(status == 404, "a deleted track's status still answers: {status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_s_status_cache_follows_changes_within_a_second() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let replica = stack.replica().await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let (status, track) = upload(&stack, &alice, &[("title", "Shared")], ("shared.wav", &wav())).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    let on_replica = |token: String| {
        let url = replica.url(&format!("/v1/tracks/{id}/status"));
        async move { json(reqwest::Client::new().get(url).bearer_auth(token).send().await?).await }
    };
    // The replica caches the status: poll it until its metrics show a hit (its listener may
    // take a moment to connect; until then the cache is bypassed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = on_replica(bob.token.clone()).await?;
        ensure!(status == 200 && body["state"] == "queued", "{status} {body}");
        let metrics = reqwest::get(replica.url("/metrics")).await?.text().await?;
        let hits = metrics
            .lines()
            .find_map(|line| line.strip_prefix("waveline_status_cache_total{result=\"hit\"}"))
            .and_then(|value| value.trim().parse::<f64>().ok());
        if hits >= Some(1.0) {
            break;
        }
        ensure!(Instant::now() < deadline, "the replica never answered from its cache");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A change on the first replica reaches the second through the notification.
    make_private(&stack, &alice, &id).await?;
    let changed = Instant::now();
    loop {
        let (status, body) = on_replica(bob.token.clone()).await?;
        if status == 404 {
            break;
        }
        ensure!(changed.elapsed() < Duration::from_secs(1), "the other replica still shows it: {status} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_when_its_track_turns_private() -> Result<()> {
    use futures::StreamExt as _;
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let (status, track) = upload(&stack, &alice, &[("title", "Watched")], ("watched.wav", &wav())).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    // An anonymous watcher has its first event before the change.
    let stranger = reqwest::get(stack.url(&format!("/v1/tracks/{id}/events"))).await?;
    ensure!(stranger.status() == 200);
    let mut stranger = stranger.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stranger.next()).await?.context("an event")??;
    ensure!(String::from_utf8_lossy(&first).contains("queued"), "{first:?}");
    make_private(&stack, &alice, &id).await?;
    // The stranger's stream ends (no more of the track's progress for someone who may not see it).
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stranger.next().await {
            let chunk = chunk?;
            ensure!(!String::from_utf8_lossy(&chunk).contains("\"state\""), "a status after going private: {chunk:?}");
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    ensure!(ended.is_ok(), "the stranger's stream was still open 5 s after the track went private");
    ended??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_holds_a_bounded_number_of_uploads_in_progress() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_UPLOADS_PER_ACCOUNT", "1")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    // An upload in progress: the head of a multipart body, and then nothing for now.
    let mut held = connect(&stack).await?;
    let head = format!(
        "POST /v1/tracks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: multipart/form-data; boundary=XyZ\r\ntransfer-encoding: chunked\r\n\r\n",
        alice.token
    );
    held.write_all(head.as_bytes()).await?;
    let part = format!(
        "--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\ncontent-type: audio/wav\r\n\r\n{}",
        String::from_utf8_lossy(&wav()[..44])
    );
    held.write_all(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes()).await?;
    // Once the server counts it, a second upload of the account is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if metric(&stack, "waveline_uploads_in_progress").await? >= 1.0 {
            break;
        }
        ensure!(Instant::now() < deadline, "the held upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = upload(&stack, &alice, &[("title", "Second")], ("second.wav", &wav())).await?;
    ensure!(status == 429 && body["code"] == "too_many_uploads", "{status} {body}");
    // Others are not affected.
    let bob = register_and_login(&stack, "bob").await?;
    let (status, body) = upload(&stack, &bob, &[("title", "Bob's")], ("bob.wav", &wav())).await?;
    ensure!(status == 202, "{status} {body}");
    // The held upload goes away: its place is free again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = upload(&stack, &alice, &[("title", "Again")], ("again.wav", &wav())).await?;
        if status == 202 {
            break;
        }
        ensure!(status == 429 && Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
