//! Artwork and avatars over real HTTP, in both configurations: uploads of JPEG, PNG and WebP
//! made at test time, the five served sizes (dimensions, JPEG bytes, no EXIF, the EXIF
//! orientation applied, the centre square), caching (immutable, ETag, 304), replacement,
//! refusals (not an image, too large, a decompression bomb, not the owner), a track's
//! embedded cover art becoming its artwork unless the owner uploads one, the CLI's view of a
//! track with artwork, and an image job dead-lettered when the storage stays down.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_tests::images::{
    decode, fetch, has_exif, jpeg, near, picture, png, png_bomb, put_image, size_url, wait_image, webp,
    with_orientation,
};
use waveline_tests::stack::{Mode, Stack, User, json, register_and_login, upload, wait_ready};
use waveline_tests::{S3Server, audio, temp_dir};

const RED: [u8; 3] = [220, 20, 20];
const BLUE: [u8; 3] = [20, 20, 220];
const GREEN: [u8; 3] = [20, 200, 20];

const SIZES: [(&str, u32); 5] = [("t500x500", 500), ("t300x300", 300), ("large", 100), ("t67x67", 67), ("small", 32)];

/// Uploads a 2 s tone as `visibility` and waits until it is ready; returns its id.
async fn ready_track(stack: &Stack, owner: &User, visibility: &str) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("t.wav");
    audio::tone(&path, 2.0, 22050, 1, &[])?;
    let wav = std::fs::read(&path)?;
    let (status, track) =
        upload(stack, owner, &[("title", "Song"), ("visibility", visibility)], ("t.wav", &wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

async fn get(stack: &Stack, user: Option<&User>, path: &str) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().get(stack.url(path));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    json(request.send().await?).await
}

/// Every size behind `large`: 200, a JPEG of the right side with no EXIF, cached for a year
/// as immutable, with an ETag that answers 304. Returns the decoded `t500x500`.
async fn check_sizes(stack: &Stack, large: &str) -> Result<image::RgbImage> {
    ensure!(large.starts_with("/v1/images/") && large.ends_with("/large.jpg"), "{large}");
    let mut biggest = None;
    for (size, side) in SIZES {
        let url = size_url(large, size);
        let (status, headers, bytes) = fetch(stack, &url).await?;
        ensure!(status == 200, "GET {url}: {status}");
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        ensure!(header("content-type") == "image/jpeg", "{url}: {}", header("content-type"));
        ensure!(header("cache-control") == "public, max-age=31536000, immutable", "{url}: {}", header("cache-control"));
        ensure!(header("cross-origin-resource-policy") == "cross-origin", "{url}: pages elsewhere show it");
        ensure!(!has_exif(&bytes), "{url} carries EXIF");
        let decoded = decode(&bytes)?;
        ensure!(decoded.dimensions() == (side, side), "{url}: {:?}", decoded.dimensions());
        let etag = header("etag");
        ensure!(etag.starts_with('"'), "{url}: ETag {etag:?}");
        let again = reqwest::Client::new().get(stack.url(&url)).header("if-none-match", &etag).send().await?;
        ensure!(again.status().as_u16() == 304, "{url} with If-None-Match: {}", again.status());
        if size == "t500x500" {
            biggest = Some(decoded);
        }
    }
    biggest.context("no t500x500")
}

/// Polls `path` until the image's URL is `url`-less or different from `old` and its state is
/// final; fails after 60 s.
async fn wait_replaced(
    stack: &Stack,
    user: &User,
    path: &str,
    state: &str,
    url: &str,
    old: Option<&str>,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = wait_image(stack, Some(user), path, state).await?;
        if body[state] == "failed" || body[url].as_str() != old {
            return Ok(body);
        }
        ensure!(Instant::now() < deadline, "{path}: {url} still {old:?}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `url` answers 404 (a replaced version's objects are removed just after the
/// new one is served).
async fn wait_gone(stack: &Stack, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = fetch(stack, url).await?;
        if status == 404 {
            return Ok(());
        }
        ensure!(status == 200, "GET {url}: {status}");
        ensure!(Instant::now() < deadline, "{url} still served 30 s after it was replaced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn refused(response: (u16, Value), status: u16, code: &str) -> Result<()> {
    let (got, body) = response;
    ensure!(got == status && body["code"] == code, "expected {status} {code}, got {got} {body}");
    Ok(())
}

/// A red, then blue picture: `width`×`height`, the left half red, the right half blue.
fn halves(width: u32, height: u32) -> image::RgbImage {
    picture(width, height, |x, _| if x < width / 2 { RED } else { BLUE })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artwork_and_avatars_embedded() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, &[("WAVELINE_RATE_LIMIT_PER_MINUTE", "0")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let track = ready_track(&stack, &alice, "public").await?;
    let track_path = format!("/v1/tracks/{track}");
    let (_, before) = get(&stack, None, &track_path).await?;
    ensure!(before.get("artwork_url").is_none() && before.get("artwork_state").is_none(), "{before}");

    // A landscape JPEG: only its centre square survives (green, between red margins).
    let landscape = picture(640, 400, |x, _| if (120..520).contains(&x) { GREEN } else { RED });
    let (status, accepted) = put_image(&stack, &alice, &format!("{track_path}/artwork"), &jpeg(&landscape)?).await?;
    ensure!(status == 202 && accepted["state"] == "pending" && accepted.get("url").is_none(), "{status} {accepted}");
    let done = wait_image(&stack, None, &track_path, "artwork_state").await?;
    ensure!(done["artwork_state"] == "ready" && done.get("artwork_error").is_none(), "{done}");
    let first = done["artwork_url"].as_str().context("artwork_url")?.to_owned();
    let t500 = check_sizes(&stack, &first).await?;
    for (x, y) in [(2, 2), (497, 2), (2, 497), (497, 497), (250, 250)] {
        ensure!(near(t500.get_pixel(x, y).0, GREEN), "({x},{y}) is {:?}: not the centre square", t500.get_pixel(x, y));
    }
    // The same URL in lists.
    let (_, listed) = get(&stack, None, "/v1/tracks?owner=alice").await?;
    ensure!(listed["tracks"][0]["artwork_url"] == first.as_str(), "{listed}");

    // A portrait-making EXIF orientation on a 200×100 JPEG (red left, blue right): turned 90°
    // clockwise it is 100×200, red on top, and its centre square is red above blue.
    let (status, playlist) = json(
        reqwest::Client::new()
            .post(stack.url("/v1/playlists"))
            .bearer_auth(&alice.token)
            .json(&json!({"title": "Mix", "track_ids": [track]}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201 && playlist.get("artwork_url").is_none(), "{status} {playlist}");
    let playlist_path = format!("/v1/playlists/{}", playlist["id"].as_str().context("playlist id")?);
    let turned = with_orientation(&jpeg(&halves(200, 100))?, 6)?;
    ensure!(has_exif(&turned), "the fixture carries its EXIF");
    let (status, accepted) = put_image(&stack, &alice, &format!("{playlist_path}/artwork"), &turned).await?;
    ensure!(status == 202, "{status} {accepted}");
    let done = wait_image(&stack, None, &playlist_path, "artwork_state").await?;
    ensure!(done["artwork_state"] == "ready", "{done}");
    let t500 = check_sizes(&stack, done["artwork_url"].as_str().context("artwork_url")?).await?;
    ensure!(
        near(t500.get_pixel(250, 100).0, RED),
        "top: {:?}: the orientation was not applied",
        t500.get_pixel(250, 100)
    );
    ensure!(near(t500.get_pixel(250, 400).0, BLUE), "bottom: {:?}", t500.get_pixel(250, 400));
    let (_, alice_lists) = get(&stack, None, "/v1/users/alice/playlists").await?;
    ensure!(alice_lists["playlists"][0]["artwork_url"] == done["artwork_url"], "{alice_lists}");

    // A transparent PNG avatar: flattened onto white.
    let (status, accepted) = put_image(&stack, &alice, "/v1/me/avatar", &png(&picture(64, 64, |_, _| RED), 0)?).await?;
    ensure!(status == 202, "{status} {accepted}");
    let me = wait_image(&stack, Some(&alice), "/v1/me", "avatar_state").await?;
    ensure!(me["avatar_state"] == "ready", "{me}");
    let avatar = me["avatar_url"].as_str().context("avatar_url")?;
    let (_, profile) = get(&stack, None, "/v1/users/alice").await?;
    ensure!(profile["avatar_url"] == avatar && profile["avatar_state"] == "ready", "{profile}");
    let t500 = check_sizes(&stack, avatar).await?;
    ensure!(near(t500.get_pixel(10, 10).0, [255, 255, 255]), "{:?}", t500.get_pixel(10, 10));

    // A WebP replaces the track's JPEG: a new URL, and the old one goes.
    let (status, accepted) =
        put_image(&stack, &alice, &format!("{track_path}/artwork"), &webp(&picture(300, 300, |_, _| BLUE))?).await?;
    ensure!(status == 202 && accepted["url"] == first.as_str(), "the old version is served meanwhile: {accepted}");
    let done = wait_replaced(&stack, &alice, &track_path, "artwork_state", "artwork_url", Some(&first)).await?;
    ensure!(done["artwork_state"] == "ready", "{done}");
    let second = done["artwork_url"].as_str().context("artwork_url")?.to_owned();
    let t500 = check_sizes(&stack, &second).await?;
    ensure!(near(t500.get_pixel(250, 250).0, BLUE), "{:?}", t500.get_pixel(250, 250));
    wait_gone(&stack, &first).await?;

    // A decompression bomb passes the API (its signature is a PNG's) and fails in the worker;
    // the previous artwork stays.
    let (status, _) = put_image(&stack, &alice, &format!("{track_path}/artwork"), &png_bomb(100_000)?).await?;
    ensure!(status == 202, "{status}");
    let done = wait_image(&stack, None, &track_path, "artwork_state").await?;
    ensure!(done["artwork_state"] == "failed" && done["artwork_error"]["code"] == "invalid_image", "{done}");
    ensure!(done["artwork_url"] == second.as_str(), "the served artwork changed: {done}");
    // The CLI prints the API's view of the track, its artwork fields with it.
    let shown = stack.cli(&["tracks", "show", &track, "--json"])?;
    ensure!(shown == done, "tracks show --json: {shown}\nGET {track_path}: {done}");
    let listed = stack.cli(&["tracks", "list", "--json"])?;
    ensure!(listed["tracks"].as_array().is_some_and(|t| t.contains(&done)), "tracks list --json: {listed}");

    // Refusals at the API.
    let not_image = b"ID3\x04\0\0\0\0\0\0 not an image at all".to_vec();
    refused(put_image(&stack, &alice, &format!("{track_path}/artwork"), &not_image).await?, 415, "unsupported_image")
        .await?;
    refused(
        put_image(&stack, &alice, "/v1/me/avatar", b"<svg xmlns='http://www.w3.org/2000/svg'/>").await?,
        415,
        "unsupported_image",
    )
    .await?;
    // Too large: refused from Content-Length before the body is read (only the head is sent
    // here, so the answer cannot be lost to a reset), and while streaming when there is none.
    let head = format!(
        "PUT /v1/me/avatar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n",
        alice.token,
        11 * 1024 * 1024
    );
    let mut socket = tokio::net::TcpStream::connect(stack.base.trim_start_matches("http://")).await?;
    tokio::io::AsyncWriteExt::write_all(&mut socket, head.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut answer))
        .await??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(answer.starts_with("HTTP/1.1 413") && answer.contains("\"too_large\""), "{answer}");
    let mut huge = jpeg(&picture(16, 16, |_, _| RED))?;
    huge.resize(10 * 1024 * 1024 + 1, 0);
    let (content_type, body) = waveline_tests::stack::multipart(&[], Some(("big.jpg", &huge)));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = reqwest::Client::new()
        .put(stack.url("/v1/me/avatar"))
        .bearer_auth(&alice.token)
        .header("content-type", content_type)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    refused(json(response).await?, 413, "too_large").await?;
    let me = wait_image(&stack, Some(&alice), "/v1/me", "avatar_state").await?;
    ensure!(me["avatar_url"] == avatar, "a refused upload changed the avatar: {me}");
    // Another account: 403 on what it may see, 404 on what it may not.
    let small = jpeg(&picture(32, 32, |_, _| RED))?;
    refused(put_image(&stack, &bob, &format!("{track_path}/artwork"), &small).await?, 403, "forbidden").await?;
    refused(put_image(&stack, &bob, &format!("{playlist_path}/artwork"), &small).await?, 403, "forbidden").await?;
    let private = ready_track(&stack, &alice, "private").await?;
    refused(put_image(&stack, &bob, &format!("/v1/tracks/{private}/artwork"), &small).await?, 404, "not_found").await?;

    // A private track's artwork: its URL is in the owner's view only; made up ones are 404.
    let (status, _) = put_image(&stack, &alice, &format!("/v1/tracks/{private}/artwork"), &small).await?;
    ensure!(status == 202);
    let done = wait_image(&stack, Some(&alice), &format!("/v1/tracks/{private}"), "artwork_state").await?;
    let private_url = done["artwork_url"].as_str().context("artwork_url")?.to_owned();
    let (status, _) = get(&stack, Some(&bob), &format!("/v1/tracks/{private}")).await?;
    ensure!(status == 404, "{status}");
    let guessed = format!("/v1/images/tracks/{private}/{}/large.jpg", "0".repeat(32));
    ensure!(fetch(&stack, &guessed).await?.0 == 404, "a made-up version is served");
    for bad in ["/v1/images/albums/x/y/large.jpg", "/v1/images/tracks/not-a-uuid/00/large.jpg"] {
        ensure!(fetch(&stack, bad).await?.0 == 404, "{bad}");
    }
    ensure!(fetch(&stack, &size_url(&private_url, "t1000x1000")).await?.0 == 404);

    // Deleting the track removes its artwork.
    let response = reqwest::Client::new()
        .delete(stack.url(&format!("/v1/tracks/{private}")))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    ensure!(response.status().as_u16() == 204, "{}", response.status());
    ensure!(fetch(&stack, &private_url).await?.0 == 404, "a deleted track's artwork is still served");
    Ok(())
}

/// An MP3 of a 3 s tone carrying `cover` as its front cover.
fn mp3_with_cover(dir: &std::path::Path, cover: &[u8]) -> Result<Vec<u8>> {
    let cover_path = dir.join("cover.jpg");
    std::fs::write(&cover_path, cover)?;
    let out = dir.join("song.mp3");
    let source = audio::tone_source(3.0, 44_100, 2);
    audio::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &source,
        "-i",
        cover_path.to_str().context("temp path")?,
        "-map",
        "0:a",
        "-map",
        "1:v",
        "-c:a",
        "libmp3lame",
        "-c:v",
        "copy",
        "-id3v2_version",
        "3",
        "-disposition:v",
        "attached_pic",
        out.to_str().context("temp path")?,
    ])?;
    Ok(std::fs::read(out)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_cover_art_and_uploads_distributed() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, &[("WAVELINE_RATE_LIMIT_PER_MINUTE", "0")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let dir = temp_dir()?;
    let song = mp3_with_cover(dir.path(), &jpeg(&picture(64, 64, |_, _| RED))?)?;

    // Cover art in the file, no upload: it becomes the track's artwork once processed.
    let (status, track) = upload(&stack, &alice, &[("title", "Covered")], ("song.mp3", &song)).await?;
    ensure!(status == 202, "{status} {track}");
    let covered = track["id"].as_str().context("id")?.to_owned();
    wait_ready(&stack, &alice, &covered, 1).await?;
    let done = wait_image(&stack, None, &format!("/v1/tracks/{covered}"), "artwork_state").await?;
    ensure!(done["artwork_state"] == "ready", "{done}");
    let t500 = check_sizes(&stack, done["artwork_url"].as_str().context("artwork_url")?).await?;
    ensure!(near(t500.get_pixel(250, 250).0, RED), "not the embedded cover: {:?}", t500.get_pixel(250, 250));

    // Cover art in the file and an upload: the upload wins, whichever lands first.
    let (status, track) = upload(&stack, &alice, &[("title", "Uploaded")], ("song.mp3", &song)).await?;
    ensure!(status == 202, "{status} {track}");
    let uploaded = track["id"].as_str().context("id")?.to_owned();
    let (status, accepted) =
        put_image(&stack, &alice, &format!("/v1/tracks/{uploaded}/artwork"), &jpeg(&halves(400, 400))?).await?;
    ensure!(status == 202, "{status} {accepted}");
    wait_ready(&stack, &alice, &uploaded, 1).await?;
    let done = wait_image(&stack, None, &format!("/v1/tracks/{uploaded}"), "artwork_state").await?;
    ensure!(done["artwork_state"] == "ready", "{done}");
    let t500 = check_sizes(&stack, done["artwork_url"].as_str().context("artwork_url")?).await?;
    ensure!(
        near(t500.get_pixel(100, 250).0, RED) && near(t500.get_pixel(400, 250).0, BLUE),
        "not the uploaded artwork: {:?} {:?}",
        t500.get_pixel(100, 250),
        t500.get_pixel(400, 250)
    );
    // Processing the track again does not bring the embedded cover back.
    let response = reqwest::Client::new()
        .post(stack.url(&format!("/v1/tracks/{uploaded}/reprocess")))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    ensure!(response.status().as_u16() == 202, "{}", response.status());
    wait_ready(&stack, &alice, &uploaded, 2).await?;
    let (_, after) = get(&stack, None, &format!("/v1/tracks/{uploaded}")).await?;
    ensure!(after["artwork_url"] == done["artwork_url"] && after["artwork_state"] == "ready", "{after}");

    // A bomb fails here too, with the code.
    let (status, _) = put_image(&stack, &alice, "/v1/me/avatar", &png_bomb(100_000)?).await?;
    ensure!(status == 202, "{status}");
    let me = wait_image(&stack, Some(&alice), "/v1/me", "avatar_state").await?;
    ensure!(me["avatar_state"] == "failed" && me["avatar_url"].is_null(), "{me}");
    let (_, profile) = get(&stack, None, "/v1/users/alice").await?;
    ensure!(profile["avatar_error"]["code"] == "invalid_image", "{profile}");
    Ok(())
}

/// An image job that uses every attempt (the storage is down for all of them) is
/// dead-lettered: the avatar shows it failed `retries_exhausted`, `waveline jobs dead` lists
/// the letter, and once the storage is back `waveline jobs replay` makes the sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_job_out_of_attempts_is_dead_lettered_and_replays_distributed() -> Result<()> {
    let mut s3 = S3Server::start()?;
    let extra = [
        ("WAVELINE_RATE_LIMIT_PER_MINUTE", "0"),
        ("WAVELINE_JOB_MAX_ATTEMPTS", "3"),
        ("WAVELINE_JOB_RETRY_BASE_MS", "200"),
    ];
    // No worker yet: the upload is stored and queued while the storage is up.
    let mut stack = Stack::start_distributed_on(&s3.endpoint(), false, &extra).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let (status, accepted) = put_image(&stack, &alice, "/v1/me/avatar", &jpeg(&halves(200, 100))?).await?;
    ensure!(status == 202 && accepted["state"] == "pending", "{status} {accepted}");
    s3.pause()?;
    stack.start_worker()?;

    let me = wait_image(&stack, Some(&alice), "/v1/me", "avatar_state").await?;
    ensure!(me["avatar_state"] == "failed" && me.get("avatar_url").is_none(), "{me}");
    let (_, profile) = get(&stack, None, "/v1/users/alice").await?;
    ensure!(profile["avatar_state"] == "failed" && profile["avatar_error"]["code"] == "retries_exhausted", "{profile}");
    // What the owner sees says what went wrong, not where.
    let message = profile["avatar_error"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("3 attempts") && message.contains("storage"), "{message}");
    ensure!(!message.contains("127.0.0.1") && !message.contains(&s3.port.to_string()), "{message}");

    let dead = stack.cli(&["jobs", "dead", "--json"])?;
    let letters = dead["dead"].as_array().context("dead")?;
    ensure!(letters.len() == 1 && letters[0]["code"] == "retries_exhausted", "{dead}");
    let job = &letters[0]["job"];
    ensure!(job["kind"] == "process_image" && job["subject"] == "user" && job["subject_id"] == alice.id, "{dead}");

    // With the storage back, the operator replays it and the sizes are made.
    s3.resume()?;
    let replayed = stack.cli(&["jobs", "replay", "--all", "--json"])?;
    ensure!(replayed["replayed"] == 1, "{replayed}");
    let done = wait_image(&stack, None, "/v1/users/alice", "avatar_state").await?;
    ensure!(done["avatar_state"] == "ready" && done["avatar_error"].is_null(), "{done}");
    let t500 = check_sizes(&stack, done["avatar_url"].as_str().context("avatar_url")?).await?;
    let (left, right) = (t500.get_pixel(100, 250).0, t500.get_pixel(400, 250).0);
    ensure!(near(left, RED) && near(right, BLUE), "not the uploaded avatar: {left:?} {right:?}");
    let dead = stack.cli(&["jobs", "dead", "--json"])?;
    ensure!(dead["dead"].as_array().is_some_and(Vec::is_empty), "{dead}");
    Ok(())
}
