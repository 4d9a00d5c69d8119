//! The HTTP API over real HTTP, against the real `waveline serve` binary, in both
//! configurations:
//!
//! - **embedded**: `serve --workers 1`, the in-process queue and the filesystem store;
//! - **distributed**: `serve` without workers, a separate `waveline worker` process,
//!   RabbitMQ and S3 (s3s-fs).
//!
//! The full flow runs in both: accounts, a multipart upload and a direct upload, SSE until
//! `ready`, ETag polling, every range form byte-compared with the stored rendition, 416 and
//! `If-Range`, HEAD, HLS, waveforms, the catalogue, access rules, reprocessing and deletion.
//! Bad input, the error shape, readiness and the OpenAPI document are checked once.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt;
use serde_json::{Value, json};
use waveline_shared::db::PgTracks;
use waveline_shared::domain::TrackId;
use waveline_shared::storage::{self, ObjectKey, Storage as _, byte_stream};
use waveline_tests::stack::{
    Mode, Stack, User, header, json, multipart, post_form, register, register_and_login, upload, wait_ready,
};
use waveline_tests::{S3Server, audio, s3_credentials, s3_endpoint, temp_dir};

/// How many `POST /v1/tracks` requests the server's `/metrics` counts as answered, whatever
/// their status.
async fn uploads_counted(stack: &Stack) -> Result<u64> {
    let metrics = reqwest::get(stack.url("/metrics")).await?.text().await?;
    Ok(metrics
        .lines()
        .filter(|line| {
            line.starts_with("waveline_http_requests_total{")
                && line.contains("method=\"POST\"")
                && line.contains("route=\"/v1/tracks\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Follows `/events` to its end; returns every event's data.
async fn follow_events(stack: &Stack, user: &User, id: &str) -> Result<Vec<Value>> {
    let response = reqwest::Client::new()
        .get(stack.url(&format!("/v1/tracks/{id}/events")))
        .header("cookie", &user.cookie)
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    ensure!(header(&response, "content-type").starts_with("text/event-stream"), "{:?}", response.headers());
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.next()).await.context("SSE: no end within 120 s")?;
        let Some(chunk) = next else { break };
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut kind = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = Some(value.trim().to_owned());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            ensure!(kind.as_deref() == Some("status"), "unexpected event type {kind:?}");
            events.push(serde_json::from_str(&data)?);
        }
    }
    Ok(events)
}

async fn stored_bytes(stack: &Stack, key: &str) -> Result<Vec<u8>> {
    let read = stack.storage.get(&ObjectKey::parse(key)?, None).await?;
    let chunks: Vec<bytes::Bytes> = read
        .body
        .map(|c| c.map_err(anyhow::Error::from))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    Ok(chunks.concat())
}

async fn get_bytes(request: reqwest::RequestBuilder) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Ok((status, headers, response.bytes().await?.to_vec()))
}

fn h(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Every range form of one progressive stream against the stored bytes.
async fn check_ranges(
    stack: &Stack,
    user: &User,
    id: &str,
    preset: &str,
    stored: &[u8],
    content_type: &str,
) -> Result<()> {
    let client = reqwest::Client::new();
    let url = stack.url(&format!("/v1/tracks/{id}/stream/{preset}"));
    let len = stored.len();
    ensure!(len > 2000, "{preset}: only {len} bytes stored");
    let (status, headers, body) = get_bytes(client.get(&url).bearer_auth(&user.token)).await?;
    ensure!(status == 200 && body == stored, "{preset}: whole body {status}, {} bytes", body.len());
    ensure!(h(&headers, "content-type") == content_type, "{preset}: {headers:?}");
    ensure!(h(&headers, "accept-ranges") == "bytes" && h(&headers, "content-length") == len.to_string());
    let etag = h(&headers, "etag");
    ensure!(etag.starts_with('"') && etag.ends_with('"'), "{preset}: not a strong ETag: {etag:?}");
    let last_modified = h(&headers, "last-modified");
    ensure!(last_modified.ends_with(" GMT"), "{preset}: {last_modified:?}");

    let forms: [(String, usize, usize); 5] = [
        ("bytes=0-99".into(), 0, 99),
        ("bytes=1000-1999".into(), 1000, 1999),
        (format!("bytes={}-", len - 300), len - 300, len - 1),
        ("bytes=-500".into(), len - 500, len - 1),
        (format!("bytes=100-{}", len + 5000), 100, len - 1),
    ];
    for (range, first, last) in forms {
        let (status, headers, body) =
            get_bytes(client.get(&url).bearer_auth(&user.token).header("range", &range)).await?;
        ensure!(status == 206, "{preset} {range}: {status}");
        ensure!(body == stored[first..=last], "{preset} {range}: the bytes differ from the stored rendition");
        ensure!(h(&headers, "content-range") == format!("bytes {first}-{last}/{len}"), "{preset} {range}: {headers:?}");
        ensure!(h(&headers, "content-length") == (last - first + 1).to_string());
        ensure!(h(&headers, "etag") == etag && h(&headers, "content-type") == content_type);
    }
    // Unsatisfiable.
    for range in [format!("bytes={len}-"), format!("bytes={}-{}", len + 10, len + 20)] {
        let response = client.get(&url).bearer_auth(&user.token).header("range", &range).send().await?;
        let content_range = header(&response, "content-range");
        let (status, body) = json(response).await?;
        ensure!(status == 416 && body["code"] == "range_not_satisfiable", "{preset} {range}: {status} {body}");
        ensure!(content_range == format!("bytes */{len}"), "{preset} {range}: {content_range:?}");
    }
    // If-Range: the current ETag keeps the range, a stale one gets the whole body, and so
    // does an old date.
    let keep = client.get(&url).bearer_auth(&user.token).header("range", "bytes=0-9").header("if-range", &etag);
    let (status, _, body) = get_bytes(keep).await?;
    ensure!(status == 206 && body == stored[..10], "{preset}: If-Range with the current ETag: {status}");
    let stale = client.get(&url).bearer_auth(&user.token).header("range", "bytes=0-9").header("if-range", "\"stale\"");
    let (status, _, body) = get_bytes(stale).await?;
    ensure!(status == 200 && body == stored, "{preset}: If-Range with a stale ETag: {status}, {} bytes", body.len());
    let dated = client
        .get(&url)
        .bearer_auth(&user.token)
        .header("range", "bytes=0-9")
        .header("if-range", "Mon, 01 Jan 2001 00:00:00 GMT");
    let (status, _, _) = get_bytes(dated).await?;
    ensure!(status == 200, "{preset}: If-Range with an old date: {status}");
    // A validator match is 304.
    let (status, _, body) = get_bytes(client.get(&url).bearer_auth(&user.token).header("if-none-match", &etag)).await?;
    ensure!(status == 304 && body.is_empty(), "{preset}: If-None-Match: {status}");
    // HEAD: the headers of the GET, no body.
    let (status, headers, body) = get_bytes(client.head(&url).bearer_auth(&user.token)).await?;
    ensure!(status == 200 && body.is_empty(), "{preset}: HEAD {status}");
    ensure!(h(&headers, "content-length") == len.to_string() && h(&headers, "etag") == etag, "{headers:?}");
    ensure!(h(&headers, "content-type") == content_type && h(&headers, "accept-ranges") == "bytes");
    let (status, headers, _) =
        get_bytes(client.head(&url).bearer_auth(&user.token).header("range", "bytes=-10")).await?;
    ensure!(status == 206 && h(&headers, "content-range") == format!("bytes {}-{}/{len}", len - 10, len - 1));
    Ok(())
}

async fn full_flow(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, &[]).await?;
    let client = reqwest::Client::new();
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob_2").await?;

    // Accounts: duplicates, bad fields, wrong passwords, who am I (bearer and cookie). A taken
    // email gets the answer a free one gets, and nothing is created; a taken username is 409.
    let (status, body) = register(&stack, "ALICE@example.com", "alice2", "0123456789").await?;
    ensure!(status == 202 && body["message"].is_string(), "{status} {body}");
    let (fresh_status, fresh) = register(&stack, "newcomer@example.com", "newcomer", "0123456789").await?;
    ensure!((fresh_status, &fresh) == (status, &body), "{fresh_status} {fresh} differs from {status} {body}");
    let alices: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE lower(email) = 'alice@example.com'")
        .fetch_one(&stack.db.pool)
        .await?;
    ensure!(alices == 1, "{alices} accounts with alice's email");
    ensure!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users WHERE username = 'alice2'")
            .fetch_one(&stack.db.pool)
            .await?
            == 0,
        "an account was made for a taken email"
    );
    let (status, body) = register(&stack, "carol@example.com", "alice", "0123456789").await?;
    ensure!(status == 409 && body["code"] == "username_taken", "{status} {body}");
    for (email, username, password) in [
        ("not-an-email", "carol", "0123456789"),
        ("c@example.com", "Carol!", "0123456789"),
        ("c@example.com", "carol", "short"),
    ] {
        let response = client
            .post(stack.url("/v1/auth/register"))
            .json(&json!({"email": email, "username": username, "password": password}))
            .send()
            .await?;
        let (status, body) = json(response).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{email} {username}: {status} {body}");
    }
    let wrong = client
        .post(stack.url("/v1/auth/login"))
        .json(&json!({"email": "alice@example.com", "password": "not-the-password"}))
        .send()
        .await?;
    let (status, body) = json(wrong).await?;
    ensure!(status == 401 && body["code"] == "invalid_credentials", "{status} {body}");
    let (status, me) = json(client.get(stack.url("/v1/me")).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 200 && me["id"] == alice.id.as_str() && me["email"] == "alice@example.com", "{me}");
    let (status, me) = json(client.get(stack.url("/v1/me")).header("cookie", &bob.cookie).send().await?).await?;
    ensure!(status == 200 && me["username"] == bob.username.as_str(), "{status} {me}");
    let (status, body) = json(client.get(stack.url("/v1/me")).send().await?).await?;
    ensure!(status == 401 && body["code"] == "unauthorized", "{status} {body}");

    // Upload through the API.
    let dir = temp_dir()?;
    let song = dir.path().join("song.flac");
    // Short: processing takes a fraction of a second, and the events must still show every
    // state it went through (they are relayed as they commit, not sampled).
    audio::tone(&song, 4.0, 44100, 2, &[])?;
    let bytes = std::fs::read(&song)?;
    let (status, track) = upload(
        &stack,
        &alice,
        &[("title", "First Light"), ("tags", "ambient, test"), ("genre", "Ambient")],
        ("song.flac", &bytes),
    )
    .await?;
    ensure!(status == 202 && track["state"] == "queued", "{status} {track}");
    ensure!(track["title"] == "First Light" && track["owner"]["username"] == "alice", "{track}");
    ensure!(track["tags"] == json!(["ambient", "test"]) && track["visibility"] == "public", "{track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    let original = stored_bytes(&stack, storage::original_key(id.parse()?).as_str()).await?;
    ensure!(original == bytes, "the stored original differs from the upload");

    // SSE until ready: states in order, progress never going back within a stage.
    let events = follow_events(&stack, &alice, &id).await?;
    let states: Vec<&str> = events.iter().filter_map(|e| e["state"].as_str()).collect();
    ensure!(states.last() == Some(&"ready"), "the events did not end at ready: {states:?}");
    ensure!(states.contains(&"processing"), "no processing event: {states:?}");
    let order = ["queued", "processing", "ready"];
    let ranks: Vec<usize> = states.iter().filter_map(|s| order.iter().position(|o| o == s)).collect();
    ensure!(ranks.windows(2).all(|w| w[0] <= w[1]), "states went backwards: {states:?}");
    ensure!(events.iter().any(|e| e["stage"].is_string()), "no stage was reported: {events:?}");
    // Every committed change is an event, however brief: the last stage before `ready` lasts
    // a few milliseconds, and no two events in a row are the same.
    ensure!(events.iter().any(|e| e["stage"] == "storing"), "the storing stage was missed: {events:?}");
    ensure!(events.windows(2).all(|w| w[0] != w[1]), "an event repeated: {events:?}");

    // Status polling with ETags.
    let status_url = stack.url(&format!("/v1/tracks/{id}/status"));
    let response = client.get(&status_url).send().await?;
    let etag = header(&response, "etag");
    let (status, body) = json(response).await?;
    ensure!(status == 200 && body["state"] == "ready" && body["progress"] == 100, "{body}");
    let unchanged = client.get(&status_url).header("if-none-match", &etag).send().await?;
    ensure!(unchanged.status() == 304 && header(&unchanged, "etag") == etag);

    // The whole track.
    let (status, track) = json(client.get(stack.url(&format!("/v1/tracks/{id}"))).send().await?).await?;
    ensure!(status == 200 && track["state"] == "ready", "{track}");
    let duration = track["duration_ms"].as_i64().context("duration_ms")?;
    ensure!((3900..=4100).contains(&duration), "duration {duration} ms for a 4 s tone");
    ensure!(track["loudness"]["integrated_lufs"].as_f64().is_some(), "{track}");
    ensure!(track["waveform_url"] == format!("/v1/tracks/{id}/waveform"), "{track}");
    ensure!(track["hls_master_url"] == format!("/v1/tracks/{id}/hls/master.m3u8"), "{track}");
    let streams: BTreeMap<String, String> = serde_json::from_value(track["stream_urls"].clone())?;
    ensure!(streams.keys().map(String::as_str).collect::<Vec<_>>() == ["mp3_128", "opus_64", "preview"], "{streams:?}");

    // Every range form, byte for byte, on every progressive preset.
    let tracks = PgTracks::new(stack.db.pool.clone());
    let track_id: TrackId = id.parse()?;
    let renditions = tracks.renditions(track_id).await?;
    for (preset, content_type) in [("mp3_128", "audio/mpeg"), ("opus_64", "audio/ogg"), ("preview", "audio/mpeg")] {
        let rendition = renditions.iter().find(|r| r.preset == preset).context("rendition row")?;
        let stored = stored_bytes(&stack, &rendition.storage_key).await?;
        check_ranges(&stack, &alice, &id, preset, &stored, content_type).await?;
    }
    let (status, body) =
        json(client.get(stack.url(&format!("/v1/tracks/{id}/stream/flac_lossless"))).send().await?).await?;
    ensure!(status == 404 && body["code"] == "not_found", "{status} {body}");

    // HLS: the master, a variant playlist and a segment it names.
    let master = client.get(stack.url(&format!("/v1/tracks/{id}/hls/master.m3u8"))).send().await?;
    ensure!(master.status() == 200 && header(&master, "content-type") == "application/vnd.apple.mpegurl");
    ensure!(header(&master, "cache-control").contains("max-age=30"), "{:?}", master.headers());
    let master = master.text().await?;
    ensure!(master.starts_with("#EXTM3U") && master.contains("#EXT-X-STREAM-INF"), "{master}");
    let variant = master.lines().find(|l| !l.starts_with('#') && !l.is_empty()).context("a variant URI")?;
    let variant_url = stack.url(&format!("/v1/tracks/{id}/hls/{variant}"));
    let playlist = client.get(&variant_url).send().await?;
    ensure!(playlist.status() == 200 && header(&playlist, "content-type") == "application/vnd.apple.mpegurl");
    let playlist = playlist.text().await?;
    let segment = playlist.lines().find(|l| l.ends_with(".m4s")).context("a media segment")?;
    let variant_dir = variant.rsplit_once('/').map_or("", |(dir, _)| dir);
    let segment_url = stack.url(&format!("/v1/tracks/{id}/hls/{variant_dir}/{segment}"));
    let (status, headers, body) = get_bytes(client.get(&segment_url)).await?;
    ensure!(status == 200 && h(&headers, "content-type") == "audio/mp4" && body.len() > 1000, "{status} {headers:?}");
    ensure!(h(&headers, "cache-control").contains("max-age=3600"));
    let (status, _, _) =
        get_bytes(client.get(stack.url(&format!("/v1/tracks/{id}/hls/{variant_dir}/..%2Fsource")))).await?;
    ensure!(status == 404, "a file outside the rendition answered {status}");

    // The waveform in its three forms.
    let (status, waveform) = json(client.get(stack.url(&format!("/v1/tracks/{id}/waveform"))).send().await?).await?;
    ensure!(status == 200, "{status}");
    for field in ["version", "channels", "sample_rate", "samples_per_pixel", "bits", "length"] {
        ensure!(waveform[field].is_u64(), "waveform JSON lacks {field}");
    }
    let length = waveform["length"].as_u64().unwrap_or_default();
    let channels = waveform["channels"].as_u64().unwrap_or_default();
    let data = waveform["data"].as_array().context("data")?;
    ensure!(length > 0 && data.len() as u64 == 2 * length * channels, "{} points for length {length}", data.len());
    ensure!(data.iter().all(|v| v.as_i64().is_some_and(|v| (-128..=127).contains(&v))), "8-bit points");
    let (status, headers, dat) =
        get_bytes(client.get(stack.url(&format!("/v1/tracks/{id}/waveform?format=dat")))).await?;
    ensure!(status == 200 && h(&headers, "content-type") == "application/octet-stream" && dat.len() > 20);
    ensure!(i32::from_le_bytes([dat[0], dat[1], dat[2], dat[3]]) == waveform["version"].as_i64().unwrap_or(-1) as i32);
    let (status, summary) =
        json(client.get(stack.url(&format!("/v1/tracks/{id}/waveform?format=summary"))).send().await?).await?;
    ensure!(status == 200 && summary.to_string().len() > 100, "{status}");
    let (status, body) =
        json(client.get(stack.url(&format!("/v1/tracks/{id}/waveform?format=png"))).send().await?).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    ensure!(body["message"].as_str().is_some_and(|message| message.starts_with("format:")), "{body}");

    // The direct-upload flow: a URL to PUT to (presigned on S3, the API's own on files).
    let (status, ticket) = json(
        client
            .post(stack.url("/v1/uploads"))
            .bearer_auth(&alice.token)
            .json(&json!({"filename": "Second Song.flac", "size": bytes.len(), "visibility": "private"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201 && ticket["method"] == "PUT", "{status} {ticket}");
    let second = ticket["track_id"].as_str().context("track_id")?.to_owned();
    let put_url = ticket["url"].as_str().context("url")?;
    let put_url = if put_url.starts_with('/') { stack.url(put_url) } else { put_url.to_owned() };
    ensure!(put_url.starts_with("http://127.0.0.1"), "{put_url}");
    match mode {
        Mode::Embedded => ensure!(put_url == stack.url(&format!("/v1/uploads/{second}")), "{put_url}"),
        Mode::Distributed => ensure!(put_url.contains("X-Amz-Signature="), "not presigned: {put_url}"),
    }
    let (status, body) =
        json(client.post(stack.url(&format!("/v1/uploads/{second}/complete"))).bearer_auth(&alice.token).send().await?)
            .await?;
    ensure!(status == 409 && body["code"] == "upload_missing", "{status} {body}");
    let mut put = client.put(&put_url).body(bytes.clone());
    for (name, value) in ticket["headers"].as_object().context("headers")? {
        put = put.header(name, value.as_str().unwrap_or_default());
    }
    if mode == Mode::Embedded {
        put = put.bearer_auth(&alice.token);
    }
    let response = put.send().await?;
    ensure!(response.status().is_success(), "PUT {}: {}", response.status(), response.text().await?);
    let (status, body) =
        json(client.post(stack.url(&format!("/v1/uploads/{second}/complete"))).bearer_auth(&bob.token).send().await?)
            .await?;
    ensure!(status == 404, "someone else completed the upload: {status} {body}");
    let (status, done) =
        json(client.post(stack.url(&format!("/v1/uploads/{second}/complete"))).bearer_auth(&alice.token).send().await?)
            .await?;
    ensure!(status == 202 && done["state"] == "queued" && done["title"] == "Second Song", "{status} {done}");
    ensure!(done["visibility"] == "private", "{done}");
    wait_ready(&stack, &alice, &second, 1).await?;

    // The catalogue: alice sees both; others see only the public one; pages chain.
    let list = |user: Option<&User>, query: String| {
        let request = client.get(stack.url(&format!("/v1/tracks{query}")));
        match user {
            Some(user) => request.bearer_auth(&user.token),
            None => request,
        }
    };
    let ids = |page: &Value| -> Vec<String> {
        page["tracks"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["id"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let (status, page) = json(list(Some(&alice), "?owner=alice".into()).send().await?).await?;
    ensure!(status == 200 && ids(&page) == [second.clone(), id.clone()] && page["next_cursor"].is_null(), "{page}");
    let (_, page) = json(list(Some(&bob), "?owner=alice".into()).send().await?).await?;
    ensure!(ids(&page) == [id.clone()], "bob sees alice's private track: {page}");
    let (_, page) = json(list(None, String::new()).send().await?).await?;
    ensure!(ids(&page) == [id.clone()], "{page}");
    let (_, first_page) = json(list(Some(&alice), "?owner=alice&limit=1".into()).send().await?).await?;
    let cursor = first_page["next_cursor"].as_str().context("a next cursor")?;
    ensure!(ids(&first_page) == [second.clone()], "{first_page}");
    let (_, next_page) =
        json(list(Some(&alice), format!("?owner=alice&limit=1&cursor={cursor}")).send().await?).await?;
    ensure!(ids(&next_page) == [id.clone()] && next_page["next_cursor"].is_null(), "{next_page}");
    // A cursor is checked against its declared pattern, then against what it encodes.
    for forged in ["forged", "9999999999999999999.0123456789abcdef0123456789abcdef"] {
        let (status, body) = json(list(None, format!("?cursor={forged}")).send().await?).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{forged}: {status} {body}");
        ensure!(body["message"].as_str().is_some_and(|message| message.starts_with("cursor:")), "{body}");
    }
    let (status, _) = json(list(None, "?owner=nobody_here".into()).send().await?).await?;
    ensure!(status == 404);

    // Access: another user's edits are 403 on a public track, 404 on a private one; a
    // private track is 404 to everyone but its owner.
    let track_url = stack.url(&format!("/v1/tracks/{id}"));
    let second_url = stack.url(&format!("/v1/tracks/{second}"));
    let (status, body) =
        json(client.patch(&track_url).bearer_auth(&bob.token).json(&json!({"title": "Mine"})).send().await?).await?;
    ensure!(status == 403 && body["code"] == "forbidden", "{status} {body}");
    let (status, _) = json(client.delete(&track_url).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 403);
    let (status, _) = json(client.post(format!("{track_url}/reprocess")).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 403);
    for request in [
        client.patch(&second_url).bearer_auth(&bob.token).json(&json!({"title": "Mine"})),
        client.delete(&second_url).bearer_auth(&bob.token),
        client.get(&second_url).bearer_auth(&bob.token),
        client.get(&second_url),
        client.get(format!("{second_url}/stream/mp3_128")),
        client.get(format!("{second_url}/status")).bearer_auth(&bob.token),
    ] {
        let (status, body) = json(request.send().await?).await?;
        ensure!(status == 404 && body["code"] == "not_found", "a private track leaked: {status} {body}");
    }
    let (status, _, _) =
        get_bytes(client.get(format!("{second_url}/stream/mp3_128")).header("cookie", &alice.cookie)).await?;
    ensure!(status == 200, "the owner cannot stream a private track: {status}");
    let (status, body) = json(client.patch(&track_url).json(&json!({"title": "x"})).send().await?).await?;
    ensure!(status == 401 && body["code"] == "unauthorized", "{status} {body}");

    // The owner edits.
    let (status, edited) = json(
        client
            .patch(&track_url)
            .bearer_auth(&alice.token)
            .json(&json!({"title": "  Renamed  ", "genre": "", "tags": ["one"]}))
            .send()
            .await?,
    )
    .await?;
    ensure!(
        status == 200 && edited["title"] == "Renamed" && edited["genre"].is_null() && edited["tags"] == json!(["one"]),
        "{edited}"
    );
    let (status, body) =
        json(client.patch(&track_url).bearer_auth(&alice.token).json(&json!({"title": ""})).send().await?).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let (status, body) =
        json(client.patch(&track_url).bearer_auth(&alice.token).json(&json!({"colour": "red"})).send().await?).await?;
    ensure!(status == 400, "an unknown field was accepted: {status} {body}");

    // Reprocessing (by an admin here, the owner below) keeps the old renditions live until
    // the new revision is ready.
    let admin = register_and_login(&stack, "admin_1").await?;
    stack.promote(&admin).await?;
    let (status, me) = json(client.get(stack.url("/v1/me")).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200 && me["role"] == "admin", "{me}");
    let (status, requeued) =
        json(client.post(format!("{track_url}/reprocess")).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 202 && requeued["state"] == "queued" && requeued["revision"] == 2, "{status} {requeued}");
    let (status, _, _) =
        get_bytes(client.get(format!("{track_url}/stream/mp3_128")).header("range", "bytes=0-9")).await?;
    ensure!(status == 206, "the old revision stopped streaming during reprocessing: {status}");
    wait_ready(&stack, &alice, &id, 2).await?;
    let (status, body) =
        json(client.patch(&track_url).bearer_auth(&admin.token).json(&json!({"title": "x"})).send().await?).await?;
    ensure!(status == 403, "an admin edited someone's track: {status} {body}");
    let (status, requeued) =
        json(client.post(format!("{second_url}/reprocess")).header("cookie", &alice.cookie).send().await?).await?;
    ensure!(
        status == 403 && requeued["code"] == "csrf_failed",
        "a cookie POST without a CSRF token: {status} {requeued}"
    );
    let (status, requeued) = json(
        client
            .post(format!("{second_url}/reprocess"))
            .header("cookie", &alice.cookie)
            .header("x-csrf-token", &alice.csrf)
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 202 && requeued["revision"] == 2, "{status} {requeued}");
    let (status, body) =
        json(client.post(format!("{second_url}/reprocess")).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 409 && body["code"] == "not_finished", "{status} {body}");
    wait_ready(&stack, &alice, &second, 2).await?;

    // Logging out ends the session.
    let response = client.post(stack.url("/v1/auth/logout")).bearer_auth(&bob.token).send().await?;
    ensure!(response.status() == 204 && header(&response, "set-cookie").contains("Max-Age=0"));
    let (status, _) = json(client.get(stack.url("/v1/me")).bearer_auth(&bob.token).send().await?).await?;
    ensure!(status == 401, "a revoked token still works");

    // The CLI prints the API's view of a track as an anonymous listener gets it (the counts
    // without anyone's own marks), the same JSON to the byte.
    let (status, viewed) = json(client.get(&track_url).send().await?).await?;
    ensure!(status == 200, "{status} {viewed}");
    let shown = stack.cli(&["tracks", "show", &id, "--json"])?;
    ensure!(shown == viewed, "tracks show --json: {shown}\nGET /v1/tracks/{{id}}: {viewed}");
    let listed = stack.cli(&["tracks", "list", "--json"])?;
    let listed = listed["tracks"].as_array().context("tracks")?;
    ensure!(listed.contains(&viewed), "tracks list --json: {listed:?}\nGET: {viewed}");

    // Deletion removes the row and every object, once the old revision's clean-up is done:
    // bytes a direct upload left under the upload key go too.
    let old_revision = storage::revision_prefix(second.parse()?, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.storage.list_prefix(&old_revision).await?.is_empty() {
        ensure!(Instant::now() < deadline, "the reprocessed track's first revision was never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leftover = storage::upload_key(id.parse()?);
    let partial = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"partial"))]);
    stack.storage.put(&leftover, "application/octet-stream", byte_stream(partial)).await?;
    let response = client.delete(&track_url).bearer_auth(&alice.token).send().await?;
    ensure!(response.status() == 204, "{}", response.status());
    let (status, _) = json(client.get(&track_url).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 404);
    for prefix in storage::track_prefixes(id.parse()?) {
        let left = stack.storage.list_prefix(&prefix).await?;
        ensure!(left.is_empty(), "objects left after deletion: {left:?}");
    }
    let second_prefix = storage::revision_prefix(second.parse()?, 2);
    ensure!(!stack.storage.list_prefix(&second_prefix).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_embedded() -> Result<()> {
    full_flow(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_distributed() -> Result<()> {
    full_flow(Mode::Distributed).await
}

/// `PUT`s `body` to a direct upload's URL as its ticket says (with the ticket's headers
/// unless `signed_headers` is off; the API's own URL with the user's token).
async fn put_upload(
    stack: &Stack,
    user: &User,
    ticket: &Value,
    body: Vec<u8>,
    signed_headers: bool,
) -> Result<(u16, String)> {
    let url = ticket["url"].as_str().context("url")?;
    let mut put = if url.starts_with('/') {
        reqwest::Client::new().put(stack.url(url)).bearer_auth(&user.token)
    } else {
        reqwest::Client::new().put(url)
    };
    for (name, value) in ticket["headers"].as_object().context("headers")? {
        if signed_headers || !name.eq_ignore_ascii_case("content-length") {
            put = put.header(name, value.as_str().unwrap_or_default());
        }
    }
    let response = put.body(body).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// A direct upload is bound to its declared size, and once complete its URL cannot change
/// what is processed; the bytes sent to it afterwards are swept away.
async fn direct_uploads_are_bound(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, &[]).await?;
    let client = reqwest::Client::new();
    let user = register_and_login(&stack, "direct").await?;
    let dir = temp_dir()?;
    let song = dir.path().join("song.wav");
    audio::tone(&song, 1.0, 8000, 1, &[])?;
    let wav = std::fs::read(&song)?;
    let start = |size: Option<usize>| {
        let request = client.post(stack.url("/v1/uploads")).bearer_auth(&user.token);
        let body = match size {
            Some(size) => json!({"filename": "song.wav", "size": size}),
            None => json!({"filename": "song.wav"}),
        };
        async move { json(request.json(&body).send().await?).await }
    };
    let complete = |id: String| {
        let request = client.post(stack.url(&format!("/v1/uploads/{id}/complete"))).bearer_auth(&user.token);
        async move { json(request.send().await?).await }
    };
    if mode == Mode::Distributed {
        // The URL is signed for a length: there must be one.
        let (status, body) = start(None).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    }
    let (status, ticket) = start(Some(wav.len())).await?;
    ensure!(status == 201, "{status} {ticket}");
    let id = ticket["track_id"].as_str().context("track_id")?.to_owned();

    // More bytes than declared: refused by S3 (the length is signed) or by the API (413).
    let mut longer = wav.clone();
    longer.extend_from_slice(&[0u8; 4096]);
    let (status, body) = put_upload(&stack, &user, &ticket, longer, false).await?;
    match mode {
        Mode::Distributed => ensure!(status == 403, "a longer body than signed got {status}: {body}"),
        Mode::Embedded => ensure!(status == 413 && body.contains("too_large"), "{status} {body}"),
    }
    let (status, body) = complete(id.clone()).await?;
    ensure!(status == 409 && body["code"] == "upload_missing", "the refused body was kept: {status} {body}");
    if mode == Mode::Embedded {
        // Fewer bytes than declared: stored, but the upload cannot complete with them.
        let (status, body) = put_upload(&stack, &user, &ticket, wav[..wav.len() - 100].to_vec(), true).await?;
        ensure!(status == 200, "{status} {body}");
        let (status, body) = complete(id.clone()).await?;
        ensure!(status == 400 && body["code"] == "size_mismatch", "{status} {body}");
    }

    let (status, body) = put_upload(&stack, &user, &ticket, wav.clone(), true).await?;
    ensure!(status == 200, "{status} {body}");
    let (status, done) = complete(id.clone()).await?;
    ensure!(status == 202 && done["state"] == "queued", "{status} {done}");

    // The URL used again after `complete`, with other bytes of the same length: S3 takes
    // them (the URL is still valid) but they land where nothing reads; the API refuses.
    let other = vec![b'x'; wav.len()];
    let (status, body) = put_upload(&stack, &user, &ticket, other, true).await?;
    match mode {
        Mode::Distributed => ensure!(status == 200, "{status} {body}"),
        Mode::Embedded => ensure!(status == 409 && body.contains("upload_completed"), "{status} {body}"),
    }
    ensure!(
        stored_bytes(&stack, storage::original_key(id.parse()?).as_str()).await? == wav,
        "the URL changed the original after complete"
    );
    wait_ready(&stack, &user, &id, 1).await?;
    // What the late PUT left is deleted by the reconciler.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = stack.storage.list_prefix(storage::UPLOADS_PREFIX).await?;
        if left.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "stray upload objects are still stored: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(stored_bytes(&stack, storage::original_key(id.parse()?).as_str()).await? == wav);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_uploads_are_bound_embedded() -> Result<()> {
    direct_uploads_are_bound(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_uploads_are_bound_distributed() -> Result<()> {
    direct_uploads_are_bound(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_leave_nothing_behind() -> Result<()> {
    // No workers: an accepted upload stays queued, which the not-ready check needs.
    let stack = Stack::start(Mode::Embedded, false, &[("WAVELINE_UPLOAD_MAX_BYTES", "200000")]).await?;
    let client = reqwest::Client::new();
    let user = register_and_login(&stack, "uploader").await?;
    let dir = temp_dir()?;
    let song = dir.path().join("song.wav");
    audio::tone(&song, 1.0, 8000, 1, &[])?;
    let wav = std::fs::read(&song)?;

    // Unauthenticated.
    let (content_type, body) = multipart(&[], Some(("song.wav", &wav)));
    let response = client.post(stack.url("/v1/tracks")).header("content-type", &content_type).body(body).send().await?;
    let challenge = header(&response, "www-authenticate");
    let (status, body) = json(response).await?;
    ensure!(status == 401 && body["code"] == "unauthorized" && challenge.starts_with("Bearer"), "{status} {body}");

    // Not audio, whatever the name and declared type say.
    let (status, body) =
        upload(&stack, &user, &[], ("song.mp3", b"<html><body>not audio at all</body></html>")).await?;
    ensure!(status == 415 && body["code"] == "not_audio", "{status} {body}");
    let png = [&b"\x89PNG\r\n\x1a\n"[..], &[0u8; 200]].concat();
    let (status, _) = upload(&stack, &user, &[], ("cover.flac", &png)).await?;
    ensure!(status == 415);
    // Empty, missing, and fields that do not belong.
    let (status, body) = upload(&stack, &user, &[], ("empty.wav", b"")).await?;
    ensure!(status == 400 && body["code"] == "empty_upload", "{status} {body}");
    let (status, body) = post_form(&stack, &user, &[("title", "no file")], None).await?;
    ensure!(status == 400 && body["code"] == "missing_file", "{status} {body}");
    let (status, body) = upload(&stack, &user, &[("owner_id", "someone")], ("song.wav", &wav)).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let (status, body) = upload(&stack, &user, &[("visibility", "secret")], ("song.wav", &wav)).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    let (status, body) = json(
        client
            .post(stack.url("/v1/tracks"))
            .bearer_auth(&user.token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 415 && body["code"] == "unsupported_media_type", "{status} {body}");

    // Oversize: refused from Content-Length, and while streaming when there is none.
    let mut big = audio::wav_header(1, 1, 8000, 16, 400_000);
    big.resize(400_044, 0);
    let (status, body) = upload(&stack, &user, &[], ("big.wav", &big)).await?;
    ensure!(status == 413 && body["code"] == "too_large", "{status} {body}");
    let (content_type, body) = multipart(&[], Some(("big.wav", &big)));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = client
        .post(stack.url("/v1/tracks"))
        .bearer_auth(&user.token)
        .header("content-type", content_type)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    let (status, body) = json(response).await?;
    ensure!(status == 413 && body["code"] == "too_large", "chunked: {status} {body}");

    // Text fields are bounded in number and in total size, repeated ones included.
    let many_tags = vec![("tags", "a"); 40];
    let (status, body) = upload(&stack, &user, &many_tags, ("song.wav", &wav)).await?;
    ensure!(status == 413 && body["code"] == "too_large", "{status} {body}");
    ensure!(body["message"].as_str().is_some_and(|m| m.starts_with("tags:")), "{body}");
    let long = "d".repeat(15_000);
    let descriptions = vec![("description", long.as_str()); 5];
    let (status, body) = upload(&stack, &user, &descriptions, ("song.wav", &wav)).await?;
    ensure!(status == 413 && body["code"] == "too_large", "{status} {body}");
    ensure!(body["message"].as_str().is_some_and(|m| m.starts_with("description:")), "{body}");

    // Malformed JSON and unknown tracks.
    let (status, body) = json(
        client
            .post(stack.url("/v1/auth/register"))
            .header("content-type", "application/json")
            .body("{\"email\": ")
            .send()
            .await?,
    )
    .await?;
    ensure!(
        status == 400 && body["code"] == "invalid_field" && !body["message"].as_str().unwrap_or("").is_empty(),
        "{status} {body}"
    );
    for path in ["/v1/tracks/{}", "/v1/tracks/{}/status", "/v1/tracks/{}/stream/mp3_128", "/v1/tracks/{}/waveform"] {
        let url = stack.url(&path.replace("{}", &TrackId::new().to_string()));
        let (status, body) = json(client.get(&url).send().await?).await?;
        ensure!(status == 404 && body["code"] == "not_found", "{url}: {status} {body}");
    }
    let (status, _) = json(client.get(stack.url("/v1/tracks/..%2F..%2Fetc%2Fpasswd")).send().await?).await?;
    ensure!(status == 404);

    // An upload cut off mid-body: the connection closes after half the file.
    let (content_type, body) = multipart(&[("title", "cut")], Some(("song.wav", &big[..150_000])));
    let mut socket = std::net::TcpStream::connect(stack.base.trim_start_matches("http://"))?;
    write!(
        socket,
        "POST /v1/tracks HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        user.token,
        body.len()
    )?;
    let counted = uploads_counted(&stack).await?;
    socket.write_all(&body[..body.len() / 2])?;
    socket.flush()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(socket);
    // The server has finished with the cut request once its metrics count it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while uploads_counted(&stack).await? == counted {
        ensure!(Instant::now() < deadline, "the cut-off upload was never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing of all that was kept.
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tracks WHERE owner_id <> '00000000-0000-7000-8000-000000000001'")
            .fetch_one(&stack.db.pool)
            .await?;
    ensure!(rows == 0, "{rows} track rows left by refused uploads");
    let objects = stack.storage.list_prefix(storage::ORIGINALS_PREFIX).await?;
    ensure!(objects.is_empty(), "objects left by refused uploads: {objects:?}");

    // A good upload is accepted; with no worker it stays queued, and its streams say so.
    let (status, track) = upload(&stack, &user, &[], ("song.wav", &wav)).await?;
    ensure!(status == 202 && track["title"] == "song", "{status} {track}");
    let id = track["id"].as_str().context("id")?;
    for path in ["stream/mp3_128", "hls/master.m3u8", "waveform"] {
        let (status, body) = json(client.get(stack.url(&format!("/v1/tracks/{id}/{path}"))).send().await?).await?;
        ensure!(status == 409 && body["code"] == "not_ready", "{path}: {status} {body}");
        ensure!(body["message"].as_str().is_some_and(|m| m.contains("queued")), "{body}");
    }
    // The catalogue shows others only what can be played; the owner sees it queued.
    let (_, public) = json(client.get(stack.url("/v1/tracks")).send().await?).await?;
    ensure!(public["tracks"] == json!([]), "an unplayable track is listed: {public}");
    let (_, own) =
        json(client.get(stack.url("/v1/tracks?owner=uploader")).bearer_auth(&user.token).send().await?).await?;
    ensure!(own["tracks"][0]["id"] == id && own["tracks"][0]["state"] == "queued", "{own}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_routes_answer_and_the_openapi_document_lists_every_route() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let health = reqwest::get(stack.url("/healthz")).await?;
    ensure!(health.status() == 200 && health.headers().contains_key("x-request-id"));
    ensure!(health.text().await? == "ok");
    let (status, ready) = json(reqwest::get(stack.url("/readyz")).await?).await?;
    ensure!(
        status == 200 && ready == json!({"database": "ok", "queue": "ok", "storage": "ok", "documents": "ok"}),
        "{ready}"
    );
    let (status, spec) = json(reqwest::get(stack.url("/openapi.json")).await?).await?;
    ensure!(status == 200 && spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{spec}");
    let paths = spec["paths"].as_object().context("paths")?;
    let expected: [(&str, &[&str]); 18] = [
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/v1/auth/register", &["post"]),
        ("/v1/auth/login", &["post"]),
        ("/v1/auth/logout", &["post"]),
        ("/v1/auth/refresh", &["post"]),
        ("/v1/me", &["get"]),
        ("/v1/tracks", &["get", "post"]),
        ("/v1/tracks/{id}", &["get", "patch", "delete"]),
        ("/v1/tracks/{id}/status", &["get"]),
        ("/v1/tracks/{id}/events", &["get"]),
        ("/v1/tracks/{id}/reprocess", &["post"]),
        ("/v1/tracks/{id}/stream/{preset}", &["get", "head"]),
        ("/v1/tracks/{id}/hls/master.m3u8", &["get", "head"]),
        ("/v1/tracks/{id}/hls/{variant}/{file}", &["get", "head"]),
        ("/v1/tracks/{id}/waveform", &["get", "head"]),
        ("/v1/uploads", &["post"]),
    ];
    for (route, methods) in expected {
        let operations = paths.get(route).with_context(|| format!("{route} is missing: {:?}", paths.keys()))?;
        for method in methods {
            ensure!(operations.get(*method).is_some(), "{method} {route} is not in the document");
        }
    }
    for route in ["/v1/uploads/{id}", "/v1/uploads/{id}/complete"] {
        ensure!(paths.contains_key(route), "{route} is missing");
    }
    let upload = &paths["/v1/tracks"]["post"];
    ensure!(
        upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"].is_object(),
        "{upload}"
    );
    ensure!(spec["components"]["securitySchemes"].as_object().is_some_and(|s| s.len() >= 2), "{}", spec["components"]);
    let docs = reqwest::get(stack.url("/docs")).await?;
    ensure!(docs.status() == 200 && docs.text().await?.to_lowercase().contains("swagger"));
    let metrics = reqwest::get(stack.url("/metrics")).await?.text().await?;
    ensure!(
        metrics.contains("waveline_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}"),
        "{metrics}"
    );
    ensure!(metrics.contains("waveline_http_request_duration_seconds"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_a_code() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, &[]).await?;
    let client = reqwest::Client::new();
    let cases = [
        (client.get(stack.url("/no/such/route")), 404, "not_found"),
        (client.get(stack.url("/v1/tracks/not-a-uuid/status")), 404, "not_found"),
        (client.get(stack.url(&format!("/v1/tracks/{}/status", uuid::Uuid::now_v7()))), 404, "not_found"),
        (client.post(stack.url("/healthz")), 405, "method_not_allowed"),
        (client.get(stack.url("/v1/tracks?limit=1000")), 400, "invalid_field"),
        (client.get(stack.url("/v1/me")).bearer_auth("not.a.jwt"), 401, "unauthorized"),
    ];
    // RFC 9110: a 405 names the methods the resource has.
    let response = client.delete(stack.url("/v1/tracks")).send().await?;
    ensure!(response.status() == 405 && header(&response, "allow") == "GET, POST", "{:?}", response.headers());
    for (request, want_status, want_code) in cases {
        let response = request.send().await?;
        let url = response.url().to_string();
        ensure!(response.headers().contains_key("x-request-id"), "{url}: no X-Request-Id");
        let (status, body) = json(response).await?;
        ensure!(status == want_status && body["code"] == want_code, "{url}: {status} {body}");
        ensure!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{url}: {body}");
    }
    Ok(())
}

/// Files that are no audio although their container is one audio comes in: the sniffer lets
/// them through (it reads magic numbers, not streams, and an MP4's `moov` box may come last),
/// and the worker fails them `unsupported_format` without storing anything but the original,
/// which stays, as SECURITY.md says.
async fn containers_without_audio_fail_unsupported_format(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, &[]).await?;
    let client = reqwest::Client::new();
    let user = register_and_login(&stack, "filmmaker").await?;
    let dir = temp_dir()?;
    let picture = "testsrc=size=64x48:rate=10";
    for name in ["video.mp4", "video.mkv"] {
        let path = dir.path().join(name);
        let path_text = path.to_str().context("path")?;
        audio::ffmpeg(&["-f", "lavfi", "-i", picture, "-t", "1", "-c:v", "mpeg4", "-an", path_text])?;
        let bytes = std::fs::read(&path)?;
        let (status, track) = upload(&stack, &user, &[], (name, &bytes)).await?;
        ensure!(status == 202 && track["state"] == "queued", "{name}: {status} {track}");
        let id = track["id"].as_str().context("id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        let body = loop {
            let status_url = stack.url(&format!("/v1/tracks/{id}/status"));
            let (status, body) = json(client.get(status_url).bearer_auth(&user.token).send().await?).await?;
            ensure!(status == 200, "{name}: {status} {body}");
            if body["state"] == "failed" || body["state"] == "ready" {
                break body;
            }
            ensure!(Instant::now() < deadline, "{name}: not finished after 60 s: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(body["state"] == "failed" && body["error"]["code"] == "unsupported_format", "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("no audio stream"), "{name}: {body}");
        let track_id: TrackId = id.parse()?;
        ensure!(stored_bytes(&stack, storage::original_key(track_id).as_str()).await? == bytes, "{name}: original");
        let renditions = stack.storage.list_prefix(&storage::renditions_prefix(track_id)).await?;
        ensure!(renditions.is_empty(), "{name}: renditions stored: {renditions:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_audio_fail_unsupported_format_embedded() -> Result<()> {
    containers_without_audio_fail_unsupported_format(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_audio_fail_unsupported_format_distributed() -> Result<()> {
    containers_without_audio_fail_unsupported_format(Mode::Distributed).await
}

/// The queues the broker has, by name (`rabbitmqctl`, as the exclusive restart tests use).
fn broker_queues() -> Result<Vec<String>> {
    let output = std::process::Command::new("rabbitmqctl").args(["list_queues", "-q", "name"]).output()?;
    ensure!(output.status.success(), "rabbitmqctl: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_distributed_stack_leaves_no_bucket_and_no_queue() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, &[]).await?;
    let setting = |name: &str| stack.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let queue = setting("WAVELINE_QUEUE_NAME").context("queue name")?;
    let storage_url = setting("WAVELINE_STORAGE").context("storage")?;
    let bucket = storage_url.strip_prefix("s3://").and_then(|rest| rest.split('?').next()).context("bucket")?;
    let (access, secret) = s3_credentials();
    let credentials = waveline_shared::storage::S3Credentials::new(access, secret, None, None, "test");
    let bucket = waveline_shared::storage::S3Storage::new(bucket, Some(&s3_endpoint()), "us-east-1", credentials);
    // Both exist while the stack runs: an upload lands in the bucket, the queue is declared.
    let user = register_and_login(&stack, "dropper").await?;
    let dir = temp_dir()?;
    let song = dir.path().join("song.wav");
    audio::tone(&song, 1.0, 44100, 2, &[])?;
    let (status, body) = upload(&stack, &user, &[], ("song.wav", &std::fs::read(&song)?)).await?;
    ensure!(status == 202, "{status} {body}");
    ensure!(!bucket.list_prefix("").await?.is_empty(), "nothing stored in the stack's bucket");
    ensure!(broker_queues()?.contains(&queue), "the stack's queue {queue} was never declared");
    drop(stack);
    ensure!(bucket.list_prefix("").await.is_err(), "the bucket outlived its stack");
    let left: Vec<String> = broker_queues()?.into_iter().filter(|name| name.starts_with(&queue)).collect();
    ensure!(left.is_empty(), "queues outlived their stack: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_distributed_stack_keeps_its_documents_in_a_mongodb_database_of_its_own() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, false, &[]).await?;
    let (status, ready) = json(reqwest::get(stack.url("/readyz")).await?).await?;
    ensure!(status == 200 && ready["documents"] == "ok", "{status} {ready}");
    let report = stack.cli(&["check", "--json"])?;
    let documents = report["checks"].as_array().and_then(|checks| checks.iter().find(|c| c["name"] == "documents"));
    ensure!(documents.is_some_and(|c| c["backend"] == "mongodb" && c["ok"] == true), "{report}");
    let mongo = stack.mongodb.as_ref().context("the distributed stack's document store")?;
    let mut collections = mongo.database().list_collection_names().await?;
    collections.sort();
    ensure!(collections == ["activities", "comments", "conversations", "messages", "notifications"], "{collections:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_document_store_when_it_is_down() -> Result<()> {
    // Nothing listens on port 1: the API starts (the driver connects lazily), and is not ready.
    let stack =
        Stack::start(Mode::Embedded, false, &[("WAVELINE_DOCUMENTS", "mongodb://127.0.0.1:1/waveline")]).await?;
    let (status, body) = json(reqwest::get(stack.url("/readyz")).await?).await?;
    ensure!(status == 503 && body["code"] == "not_ready", "{status} {body}");
    ensure!(body["message"] == "not reachable: documents", "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_dependency_that_is_down() -> Result<()> {
    let mut s3 = S3Server::start()?;
    let storage = format!("s3://wl-ready?endpoint={}&region=us-east-1", s3.endpoint());
    let (access, secret) = s3_credentials();
    let stack = Stack::start(
        Mode::Embedded,
        false,
        &[("WAVELINE_STORAGE", &storage), ("AWS_ACCESS_KEY_ID", &access), ("AWS_SECRET_ACCESS_KEY", &secret)],
    )
    .await?;
    s3.pause()?;
    let (status, body) = json(reqwest::get(stack.url("/readyz")).await?).await?;
    ensure!(status == 503 && body["code"] == "not_ready", "{status} {body}");
    let message = body["message"].as_str().unwrap_or_default();
    // What is down, and nothing of why: the store's address and the OS error go to the log.
    ensure!(message == "not reachable: storage", "{message}");
    Ok(())
}

/// A gauge or the sum of a counter's series from the server's `/metrics`.
async fn metric(base_url: &str, name: &str) -> Result<f64> {
    let metrics = reqwest::get(format!("{base_url}/metrics")).await?.text().await?;
    Ok(metrics
        .lines()
        .filter(|line| line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until the API's stream cache holds `objects` complete objects.
async fn cache_holds(stack: &Stack, objects: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = metric(&stack.base, "waveline_stream_cache_objects").await?;
        if held >= objects as f64 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the stream cache holds {held} objects after 10 s, not {objects}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The range contract, served by the distributed API from its stream cache: once each stream
/// has been read, the object store is stopped, and every range form, `If-Range`, `HEAD` and
/// 304 still answer, byte for byte, with the store's own validators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_ranges_are_served_from_the_stream_cache_while_the_store_is_down() -> Result<()> {
    let mut s3 = S3Server::start()?;
    let (access, secret) = s3_credentials();
    let credentials = storage::S3Credentials::new(access, secret, None, None, "test");
    let bucket = storage::S3Storage::new("wl-cache", Some(&s3.endpoint()), "us-east-1", credentials);
    bucket.ensure_bucket().await?;
    let store = format!("s3://wl-cache?endpoint={}&region=us-east-1", s3.endpoint());
    let stack = Stack::start(Mode::Distributed, true, &[("WAVELINE_STORAGE", &store)]).await?;
    let client = reqwest::Client::new();
    let alice = register_and_login(&stack, "alice").await?;
    let dir = temp_dir()?;
    let song = dir.path().join("song.flac");
    audio::tone(&song, 4.0, 44100, 2, &[])?;
    let (status, track) = upload(&stack, &alice, &[("title", "Cached")], ("song.flac", &std::fs::read(&song)?)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(&stack, &alice, &id, 1).await?;

    let renditions = PgTracks::new(stack.db.pool.clone()).renditions(id.parse()?).await?;
    let presets = [("mp3_128", "audio/mpeg"), ("opus_64", "audio/ogg"), ("preview", "audio/mpeg")];
    let mut stored = Vec::new();
    for (preset, _) in presets {
        let rendition = renditions.iter().find(|r| r.preset == preset).context("rendition row")?;
        let read = bucket.get(&ObjectKey::parse(rendition.storage_key.as_str())?, None).await?;
        let chunks: Vec<bytes::Bytes> = read
            .body
            .map(|c| c.map_err(anyhow::Error::from))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        stored.push(chunks.concat());
    }
    // One read of each stream fills the cache.
    for ((preset, _), bytes) in presets.iter().zip(&stored) {
        let url = stack.url(&format!("/v1/tracks/{id}/stream/{preset}"));
        let (status, _, body) = get_bytes(client.get(&url).bearer_auth(&alice.token)).await?;
        ensure!(status == 200 && body == *bytes, "{preset}: {status}, {} bytes", body.len());
    }
    cache_holds(&stack, presets.len()).await?;
    let hits = metric(&stack.base, "waveline_stream_cache_hits_total").await?;

    s3.pause()?;
    for ((preset, content_type), bytes) in presets.iter().zip(&stored) {
        check_ranges(&stack, &alice, &id, preset, bytes, content_type).await?;
    }
    // Each stream's check makes nine GETs with a body (the whole, five ranges, three If-Range).
    let served = metric(&stack.base, "waveline_stream_cache_hits_total").await? - hits;
    ensure!(served >= 9.0 * presets.len() as f64, "only {served} reads were counted as cache hits");
    // What was never read is not there: the waveform needs the store.
    let (status, _) = json(client.get(stack.url(&format!("/v1/tracks/{id}/waveform"))).send().await?).await?;
    ensure!(status == 503, "the waveform answered {status} with the store down");
    Ok(())
}

/// A reprocessed track's new revision is what its stream serves as soon as its status says
/// it is live, although the API's stream cache still holds the old revision's bytes and the
/// player was just reading them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_new_revision_is_served_at_once_past_the_stream_cache() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, &[]).await?;
    let client = reqwest::Client::new();
    let alice = register_and_login(&stack, "alice").await?;
    let dir = temp_dir()?;
    let (first_song, second_song) = (dir.path().join("first.flac"), dir.path().join("second.flac"));
    audio::tone(&first_song, 4.0, 44100, 2, &[])?;
    audio::tone(&second_song, 3.0, 48000, 1, &[])?;
    let (status, track) =
        upload(&stack, &alice, &[("title", "Twice")], ("first.flac", &std::fs::read(&first_song)?)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(&stack, &alice, &id, 1).await?;
    let url = stack.url(&format!("/v1/tracks/{id}/stream/mp3_128"));
    let (status, headers, first) = get_bytes(client.get(&url)).await?;
    ensure!(status == 200 && first.len() > 2000, "{status}");
    cache_holds(&stack, 1).await?;

    // Another original under the same key, and a new revision made from it.
    let second = std::fs::read(&second_song)?;
    let body = byte_stream(futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(second))]));
    stack.storage.put(&storage::original_key(id.parse()?), "audio/flac", body).await?;
    let response =
        client.post(stack.url(&format!("/v1/tracks/{id}/reprocess"))).bearer_auth(&alice.token).send().await?;
    let (status, requeued) = json(response).await?;
    ensure!(status == 202 && requeued["revision"] == 2, "{status} {requeued}");
    // The player keeps reading while the new revision is made.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, body) = get_bytes(client.get(&url).header("range", "bytes=0-99")).await?;
        ensure!(status == 206 && body.len() == 100, "a range during reprocessing: {status}");
        let (status, body) =
            json(client.get(stack.url(&format!("/v1/tracks/{id}/status"))).bearer_auth(&alice.token).send().await?)
                .await?;
        ensure!(status == 200 && body["state"] != "failed", "{status} {body}");
        if body["state"] == "ready" && body["revision"] == 2 {
            break;
        }
        ensure!(Instant::now() < deadline, "revision 2 is not ready after 120 s: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, new_headers, served) = get_bytes(client.get(&url)).await?;
    let renditions = PgTracks::new(stack.db.pool.clone()).renditions(id.parse()?).await?;
    let rendition = renditions.iter().find(|r| r.preset == "mp3_128").context("rendition row")?;
    ensure!(rendition.storage_key.contains("/2/"), "{}", rendition.storage_key);
    let stored = stored_bytes(&stack, &rendition.storage_key).await?;
    ensure!(stored != first, "the new revision's bytes are the old ones; the test proves nothing");
    ensure!(
        status == 200 && served == stored,
        "the stream served {} old or wrong bytes after revision 2 went live",
        served.len()
    );
    ensure!(h(&new_headers, "etag") != h(&headers, "etag"), "the ETag did not change");
    Ok(())
}
