//! Redirect mode (`stream_mode = redirect`) end to end, on the distributed stack (RabbitMQ, a
//! worker, S3 through s3s-fs, which checks SigV4 presigned URLs and their expiry for real):
//!
//! - progressive streams and waveforms answer 307 to presigned URLs whose bytes, whole and in
//!   ranges, are those a proxy-mode replica of the same stack serves; HEAD has its own URL;
//! - HLS plays in ffmpeg through the API's playlists and the presigned (or CDN) segment URIs;
//! - private tracks: 404 to strangers with no redirect, short-lived URLs for their owner that
//!   the store really refuses after their lifetime, and signed Waveline URLs whose redirects end
//!   exactly when they do; tampering and suspension behave as in proxy mode;
//! - a CDN base gets public tracks and never private ones;
//! - the setting is checked, and refused with the filesystem store.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::StreamExt as _;
use poem::EndpointExt as _;
use poem::listener::{Acceptor as _, Listener as _};
use serde_json::Value;
use url::Url;
use waveline_shared::db::PgTracks;
use waveline_shared::storage::{ObjectKey, Storage};
use waveline_tests::stack::{Mode, Stack, User, header, json, register_and_login, upload, wait_ready};
use waveline_tests::{audio, temp_dir, waveline_bin};

const REDIRECT: (&str, &str) = ("WAVELINE_STREAM_MODE", "redirect");

/// A client that shows redirects instead of following them.
fn no_follow() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("a client")
}

/// A presigned URL's signing time and lifetime, as the store will check them.
#[derive(Debug)]
struct Presigned {
    signed_at: i64,
    expires_in: i64,
}

impl Presigned {
    /// Whether the URL lasts `ttl` seconds: the grant's end is reckoned from the request's
    /// time and the signature starts at the current whole second, so a second that turns
    /// between the two shortens it by one (it never lengthens it).
    fn lasts(&self, ttl: i64) -> bool {
        (ttl - 1..=ttl).contains(&self.expires_in)
    }

    fn parse(location: &str) -> Result<Presigned> {
        let url = Url::parse(location).with_context(|| format!("not a URL: {location}"))?;
        let query: HashMap<String, String> = url.query_pairs().into_owned().collect();
        ensure!(query.contains_key("X-Amz-Signature"), "not presigned: {location}");
        let date = query.get("X-Amz-Date").context("X-Amz-Date")?;
        let signed_at = chrono::NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ")?.and_utc().timestamp();
        let expires_in = query.get("X-Amz-Expires").context("X-Amz-Expires")?.parse()?;
        Ok(Presigned { signed_at, expires_in })
    }

    /// The first second at which the store refuses it.
    fn end(&self) -> i64 {
        self.signed_at + self.expires_in
    }
}

/// The `Location` of a 307 (with `Cache-Control: no-store`), or an error naming what came.
async fn redirect_of(request: reqwest::RequestBuilder) -> Result<String> {
    let response = request.send().await?;
    let (status, location, cache) =
        (response.status().as_u16(), header(&response, "location"), header(&response, "cache-control"));
    if status != 307 {
        bail!("expected a 307, got {status}: {}", response.text().await.unwrap_or_default());
    }
    ensure!(cache == "no-store", "a redirect may be cached: {cache:?}");
    ensure!(!location.is_empty(), "a 307 without Location");
    Ok(location)
}

/// Uploads a `seconds`-long tone with `fields` and waits until it is ready.
async fn ready_tone(stack: &Stack, user: &User, seconds: f64, fields: &[(&str, &str)]) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("tone.flac");
    audio::tone(&path, seconds, 44100, 2, &[])?;
    let (status, track) = upload(stack, user, fields, ("tone.flac", &std::fs::read(&path)?)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, user, &id, 1).await?;
    Ok(id)
}

/// The storage key of a track's rendition of `preset`.
async fn rendition_key(stack: &Stack, id: &str, preset: &str) -> Result<String> {
    let renditions = PgTracks::new(stack.db.pool.clone()).renditions(id.parse()?).await?;
    Ok(renditions.iter().find(|r| r.preset == preset).context("a rendition row")?.storage_key.clone())
}

async fn stored(stack: &Stack, key: &str) -> Result<Vec<u8>> {
    let mut body = stack.storage.get(&ObjectKey::parse(key)?, None).await?.body;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(bytes)
}

/// Plays an HLS master as a player does (its playlists, every redirect and segment): ffprobe's
/// report and the seconds of audio ffmpeg decodes from the first audio stream.
async fn play(url: String, input_options: Vec<String>) -> Result<(Value, f64)> {
    tokio::task::spawn_blocking(move || {
        let options: Vec<&str> = input_options.iter().map(String::as_str).collect();
        let probe = audio::ffprobe_json_with(Path::new(&url), &options)?;
        let rate = audio::probe_number(&audio::audio_stream(&probe)?["sample_rate"]).context("a sample rate")?;
        let output = Command::new("ffmpeg")
            .args(["-hide_banner", "-nostdin", "-loglevel", "error"])
            .args(&options)
            .args(["-i", &url, "-map", "0:a:0", "-ac", "1", "-c:a", "pcm_s16le", "-f", "s16le", "-"])
            .output()?;
        ensure!(output.status.success(), "ffmpeg {url}: {}", String::from_utf8_lossy(&output.stderr));
        Ok((probe, output.stdout.len() as f64 / 2.0 / rate))
    })
    .await?
}

/// The URIs of a playlist: its non-tag lines and `URI="…"` attributes.
fn uris(playlist: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in playlist.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.starts_with('#') {
            if let Some((_, rest)) = line.split_once("URI=\"") {
                found.push(rest.split('"').next().unwrap_or_default().to_owned());
            }
        } else {
            found.push(line.to_owned());
        }
    }
    found
}

/// The first variant URI of a master playlist.
fn first_variant(master: &str) -> Result<String> {
    uris(master).into_iter().next().context("a master playlist without variants")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_streams_and_waveforms_redirect_to_the_bytes_a_proxy_serves() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, &[REDIRECT]).await?;
    let proxy = stack.replica_with(&[("WAVELINE_STREAM_MODE", "proxy")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let id = ready_tone(&stack, &alice, 4.0, &[("title", "Open Air")]).await?;
    let (client, follow) = (no_follow(), reqwest::Client::new());

    for (preset, content_type) in [("mp3_128", "audio/mpeg"), ("opus_64", "audio/ogg"), ("preview", "audio/mpeg")] {
        let path = format!("/v1/tracks/{id}/stream/{preset}");
        let proxied = client.get(proxy.url(&path)).send().await?;
        ensure!(proxied.status() == 200, "{preset}: the proxy answered {}", proxied.status());
        let etag = header(&proxied, "etag");
        let proxied = proxied.bytes().await?.to_vec();
        let len = proxied.len();
        ensure!(len > 2000, "{preset}: {len} bytes");

        // Anonymous, public track: a presigned GET valid for the public lifetime.
        let before = chrono::Utc::now().timestamp();
        let location = redirect_of(client.get(stack.url(&path))).await?;
        let presigned = Presigned::parse(&location)?;
        ensure!(presigned.lasts(3600), "{preset}: {presigned:?}");
        ensure!((before - 1..=before + 5).contains(&presigned.signed_at), "{preset}: {presigned:?} at {before}");
        let response = client.get(&location).send().await?;
        ensure!(response.status() == 200, "{preset}: the presigned URL answered {}", response.status());
        ensure!(header(&response, "content-type") == content_type && header(&response, "etag") == etag);
        ensure!(response.bytes().await?.to_vec() == proxied, "{preset}: the redirected bytes differ from the proxy's");

        // Ranges, sent to the API and carried through the redirect by the client.
        let forms: [(String, usize, usize); 4] = [
            ("bytes=0-99".into(), 0, 99),
            ("bytes=1000-1999".into(), 1000, 1999),
            ("bytes=-500".into(), len - 500, len - 1),
            (format!("bytes={}-", len - 300), len - 300, len - 1),
        ];
        for (range, first, last) in forms {
            let response = follow.get(stack.url(&path)).header("range", &range).send().await?;
            ensure!(response.status() == 206, "{preset} {range}: {}", response.status());
            ensure!(
                header(&response, "content-range") == format!("bytes {first}-{last}/{len}"),
                "{preset} {range}: {:?}",
                response.headers()
            );
            ensure!(response.bytes().await?.to_vec() == proxied[first..=last], "{preset} {range}: the bytes differ");
        }

        // HEAD has a URL of its own: S3 signs the method.
        let head = redirect_of(client.head(stack.url(&path))).await?;
        ensure!(head != location, "{preset}: HEAD got the GET's URL");
        let response = client.head(&head).send().await?;
        ensure!(response.status() == 200 && header(&response, "content-length") == len.to_string(), "{preset} HEAD");
        let response = client.head(&location).send().await?;
        ensure!(response.status() == 403, "{preset}: a GET URL answered a HEAD with {}", response.status());
    }

    // Waveforms too, in each format.
    for query in ["", "?format=dat", "?format=summary"] {
        let path = format!("/v1/tracks/{id}/waveform{query}");
        let proxied = client.get(proxy.url(&path)).send().await?;
        ensure!(proxied.status() == 200, "waveform{query}: {}", proxied.status());
        let proxied = proxied.bytes().await?;
        let location = redirect_of(client.get(stack.url(&path))).await?;
        Presigned::parse(&location)?;
        ensure!(client.get(&location).send().await?.bytes().await? == proxied, "waveform{query} differs");
    }

    // What is refused is refused as in proxy mode, without a redirect.
    for (path, status, code) in [
        (format!("/v1/tracks/{id}/stream/flac_lossless"), 404, "not_found"),
        (format!("/v1/tracks/{}/stream/mp3_128", uuid::Uuid::new_v4()), 404, "not_found"),
    ] {
        let response = client.get(stack.url(&path)).send().await?;
        ensure!(header(&response, "location").is_empty(), "{path} redirected");
        let (got, body) = json(response).await?;
        ensure!(got == status && body["code"] == code, "{path}: {got} {body}");
    }

    // The OpenAPI document says so on every listening operation, signed ones included.
    let (status, spec) = json(client.get(stack.url("/openapi.json")).send().await?).await?;
    ensure!(status == 200);
    let listening: Vec<(&String, &Value)> = spec["paths"]
        .as_object()
        .context("paths")?
        .iter()
        .filter(|(path, _)| ["/stream/", "/hls/", "/waveform"].iter().any(|part| path.contains(part)))
        .collect();
    ensure!(listening.len() == 8, "{:?}", listening.iter().map(|(path, _)| path).collect::<Vec<_>>());
    for (path, item) in listening {
        for method in ["get", "head"] {
            let redirect = &item[method]["responses"]["307"];
            ensure!(redirect["headers"]["Location"]["required"] == true, "{method} {path}: {redirect}");
        }
    }

    let metrics = client.get(stack.url("/metrics")).send().await?.text().await?;
    let counted = metrics.lines().any(|line| {
        line.starts_with("waveline_http_stream_redirects_total{")
            && line.contains("route=\"stream\"")
            && line.contains("target=\"presigned\"")
    });
    ensure!(counted, "no redirect counted in /metrics");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_plays_through_the_api_playlists_and_presigned_segments() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, &[REDIRECT, ("WAVELINE_SIGNED_URL_TTL_S", "600")]).await?;
    let proxy = stack.replica_with(&[("WAVELINE_STREAM_MODE", "proxy")]).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let id = ready_tone(&stack, &alice, 8.0, &[("title", "Long Light")]).await?;
    let client = no_follow();

    // The master is the API's, unchanged: its variant URIs stay relative, under the API.
    let master_path = format!("/v1/tracks/{id}/hls/master.m3u8");
    let master = client.get(stack.url(&master_path)).send().await?;
    ensure!(master.status() == 200 && header(&master, "content-type") == "application/vnd.apple.mpegurl");
    let master = master.text().await?;
    ensure!(master == client.get(proxy.url(&master_path)).send().await?.text().await?, "{master}");
    let variant = first_variant(&master)?;
    ensure!(!variant.contains("://"), "{variant}");

    // A variant playlist names storage directly, for the public lifetime, and is never
    // revalidated (no validators) nor cached longer than 30 s.
    let variant_path = format!("/v1/tracks/{id}/hls/{variant}");
    let response = client.get(stack.url(&variant_path)).send().await?;
    ensure!(response.status() == 200, "{}", response.status());
    ensure!(header(&response, "cache-control") == "public, max-age=30", "{:?}", response.headers());
    ensure!(header(&response, "etag").is_empty() && header(&response, "last-modified").is_empty());
    let playlist = response.text().await?;
    let proxied = client.get(proxy.url(&variant_path)).send().await?.text().await?;
    let (rewritten, relative) = (uris(&playlist), uris(&proxied));
    ensure!(rewritten.len() == relative.len() && rewritten.len() >= 3, "{playlist}");
    let variant_dir = variant.rsplit_once('/').map_or("", |(dir, _)| dir);
    for (presigned_uri, relative_uri) in rewritten.iter().zip(&relative) {
        let presigned = Presigned::parse(presigned_uri)?;
        ensure!(presigned.lasts(3600), "{presigned:?}");
        let at_storage = client.get(presigned_uri).send().await?;
        ensure!(at_storage.status() == 200, "{presigned_uri}: {}", at_storage.status());
        let through_proxy = client.get(proxy.url(&format!("/v1/tracks/{id}/hls/{variant_dir}/{relative_uri}"))).send();
        ensure!(at_storage.bytes().await? == through_proxy.await?.bytes().await?, "{relative_uri} differs");
    }
    // A segment asked of the API (an old playlist, a hand-made URL) is redirected too.
    let segment = redirect_of(client.get(stack.url(&format!("/v1/tracks/{id}/hls/{variant_dir}/{}", relative[1]))));
    Presigned::parse(&segment.await?)?;

    // ffmpeg plays it as a player would.
    let (probe, seconds) = play(stack.url(&master_path), vec![]).await?;
    ensure!(audio::audio_stream(&probe)?["codec_name"] == "aac", "{probe}");
    ensure!((seconds - 8.0).abs() < 0.25, "decoded {seconds} s of an 8 s track");

    // By signed URL: the playlists' storage URLs end when the signed URL does.
    let (status, signed) =
        json(client.get(stack.url(&format!("/v1/tracks/{id}/signed-urls"))).bearer_auth(&alice.token).send().await?)
            .await?;
    ensure!(status == 200, "{status} {signed}");
    let signed_master = stack.url(signed["hls_master_url"].as_str().context("hls_master_url")?);
    let expires: i64 = signed_master.split('/').skip_while(|p| *p != "signed").nth(1).context("expiry")?.parse()?;
    let signed_variant = Url::parse(&signed_master)?.join(&variant)?;
    let response = client.get(signed_variant.as_str()).send().await?;
    ensure!(response.status() == 200, "{}", response.status());
    let cache = header(&response, "cache-control");
    ensure!(cache.starts_with("public, max-age=") && cache[16..].parse::<i64>().is_ok_and(|s| s <= 30), "{cache}");
    for uri in uris(&response.text().await?) {
        let presigned = Presigned::parse(&uri)?;
        ensure!(presigned.end() == expires, "{presigned:?} outlives the signed URL ({expires})");
    }
    let (_, seconds) = play(signed_master, vec![]).await?;
    ensure!((seconds - 8.0).abs() < 0.25, "decoded {seconds} s by signed URL");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_tracks_redirect_only_their_listeners_and_only_as_long_as_their_access() -> Result<()> {
    let stack = Stack::start(
        Mode::Distributed,
        true,
        &[REDIRECT, ("WAVELINE_STREAM_REDIRECT_TTL_S", "5"), ("WAVELINE_SIGNED_URL_TTL_S", "120")],
    )
    .await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let admin = register_and_login(&stack, "admin").await?;
    stack.promote(&admin).await?;
    let id = ready_tone(&stack, &alice, 8.0, &[("title", "Demo"), ("visibility", "private")]).await?;
    let client = no_follow();
    let track = stack.url(&format!("/v1/tracks/{id}"));
    let stream = format!("{track}/stream/mp3_128");
    let mp3 = stored(&stack, &rendition_key(&stack, &id, "mp3_128").await?).await?;

    // Strangers: 404 as for a missing track, and no redirect.
    let master = client.get(format!("{track}/hls/master.m3u8")).bearer_auth(&alice.token).send().await?.text().await?;
    let variant = first_variant(&master)?;
    for path in ["stream/mp3_128", "hls/master.m3u8", &format!("hls/{variant}"), "waveform"] {
        for (who, request) in [
            ("anonymous", client.get(format!("{track}/{path}"))),
            ("bob", client.get(format!("{track}/{path}")).bearer_auth(&bob.token)),
        ] {
            let response = request.send().await?;
            ensure!(header(&response, "location").is_empty(), "{who} was redirected from {path}");
            let (status, body) = json(response).await?;
            ensure!(status == 404 && body["code"] == "not_found", "{who} {path}: {status} {body}");
        }
    }

    // The owner, by token or cookie: a URL that lives the short lifetime, and works.
    let now = chrono::Utc::now().timestamp();
    let by_token = redirect_of(client.get(&stream).bearer_auth(&alice.token)).await?;
    let presigned = Presigned::parse(&by_token)?;
    ensure!(presigned.lasts(5) && (now - 1..=now + 5).contains(&presigned.signed_at), "{presigned:?}");
    let by_cookie = redirect_of(client.get(&stream).header("cookie", &alice.cookie)).await?;
    ensure!(Presigned::parse(&by_cookie)?.lasts(5));
    let response = client.get(&by_token).header("range", "bytes=100-1099").send().await?;
    ensure!(response.status() == 206, "{}", response.status());
    ensure!(response.bytes().await?.to_vec() == mp3[100..=1099], "the owner's redirected range differs");
    // The store refuses it once its lifetime is over; the API hands out a fresh one.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = client.get(&by_token).send().await?.status().as_u16();
        if status == 403 {
            break;
        }
        ensure!(status == 200, "the expiring URL answered {status}");
        ensure!(Instant::now() < deadline, "a presigned URL of 5 s still works after 15 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(chrono::Utc::now().timestamp() >= presigned.end(), "refused before its end");
    let fresh = redirect_of(client.get(&stream).bearer_auth(&alice.token)).await?;
    ensure!(client.get(&fresh).send().await?.bytes().await?.to_vec() == mp3);

    // HLS by session: the variant playlist keeps the API's URIs (a 5 s URL inside a playlist
    // would die mid-track); each segment is redirected to a fresh short URL. ffmpeg plays it
    // with the session cookie.
    let response = client.get(format!("{track}/hls/{variant}")).bearer_auth(&alice.token).send().await?;
    ensure!(header(&response, "cache-control") == "private, max-age=30", "{:?}", response.headers());
    let playlist = response.text().await?;
    ensure!(uris(&playlist).iter().all(|uri| !uri.contains("://")), "a session's playlist names storage: {playlist}");
    let variant_dir = variant.rsplit_once('/').map_or("", |(dir, _)| dir);
    let segment = uris(&playlist).into_iter().last().context("a segment")?;
    let location = redirect_of(client.get(format!("{track}/hls/{variant_dir}/{segment}")).bearer_auth(&alice.token));
    ensure!(Presigned::parse(&location.await?)?.lasts(5));
    let token = alice.token.clone();
    let cookies = format!("waveline_session={token}; path=/\n");
    let (_, seconds) = play(format!("{track}/hls/master.m3u8"), vec!["-cookies".into(), cookies]).await?;
    ensure!((seconds - 8.0).abs() < 0.25, "decoded {seconds} s of the private track");

    // Signed URLs: every redirect ends exactly when the signed URL does.
    let (status, signed) =
        json(client.get(format!("{track}/signed-urls")).bearer_auth(&alice.token).send().await?).await?;
    ensure!(status == 200, "{status} {signed}");
    let signed_mp3 = stack.url(signed["stream_urls"]["mp3_128"].as_str().context("mp3 URL")?);
    let expires: i64 = signed_mp3.split('/').skip_while(|p| *p != "signed").nth(1).context("expiry")?.parse()?;
    ensure!(expires > chrono::Utc::now().timestamp() + 100, "{signed_mp3}");
    let location = redirect_of(client.get(&signed_mp3)).await?;
    let presigned = Presigned::parse(&location)?;
    ensure!(presigned.end() == expires, "{presigned:?} does not end with the signed URL ({expires})");
    ensure!(client.get(&location).send().await?.bytes().await?.to_vec() == mp3);
    let signed_master = stack.url(signed["hls_master_url"].as_str().context("HLS URL")?);
    let signed_variant = Url::parse(&signed_master)?.join(&variant)?;
    let playlist = client.get(signed_variant.as_str()).send().await?.text().await?;
    for uri in uris(&playlist) {
        ensure!(Presigned::parse(&uri)?.end() == expires, "{uri} does not end with the signed URL");
    }
    let (_, seconds) = play(signed_master, vec![]).await?;
    ensure!((seconds - 8.0).abs() < 0.25, "decoded {seconds} s by signed URL");
    let waveform = stack.url(signed["waveform_url"].as_str().context("waveform URL")?);
    ensure!(Presigned::parse(&redirect_of(client.get(&waveform)).await?)?.end() == expires);

    // A tampered signature is refused, without a redirect.
    let parts: Vec<&str> = signed_mp3.split('/').collect();
    let at = parts.iter().position(|p| *p == "signed").context("signed")? + 2;
    let mut tampered: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    tampered[at] = format!("{}x", &tampered[at][1..]);
    let response = client.get(tampered.join("/")).send().await?;
    ensure!(header(&response, "location").is_empty(), "a tampered URL was redirected");
    let (status, body) = json(response).await?;
    ensure!(status == 403 && body["code"] == "bad_signature", "{status} {body}");

    // The owner suspended: the signed URL stops redirecting (404) once the lookup cache lets
    // go; an admin still gets a redirect.
    let suspension = stack.url(&format!("/v1/admin/users/{}/suspension", alice.id));
    let (status, body) = json(client.put(&suspension).bearer_auth(&admin.token).send().await?).await?;
    ensure!(status == 200, "{status} {body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client.get(&signed_mp3).send().await?;
        if response.status() == 404 {
            ensure!(header(&response, "location").is_empty());
            break;
        }
        ensure!(response.status() == 307, "{}", response.status());
        ensure!(Instant::now() < deadline, "a suspended owner's private track still redirects after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let location = redirect_of(client.get(&stream).bearer_auth(&admin.token)).await?;
    ensure!(Presigned::parse(&location)?.lasts(5));
    Ok(())
}

/// A stand-in CDN on loopback whose origin is the stack's bucket: `GET /cdn/{key}` answers
/// the object, and every path asked for is recorded.
struct FakeCdn {
    base: String,
    storage: Arc<OnceLock<Arc<dyn Storage>>>,
    asked: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCdn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct CdnState {
    storage: Arc<OnceLock<Arc<dyn Storage>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

#[poem::handler]
async fn cdn_get(req: &poem::Request, poem::web::Data(state): poem::web::Data<&CdnState>) -> poem::Response {
    let path = req.uri().path().trim_start_matches("/cdn/").to_owned();
    state.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(path.clone());
    let key = percent_decode(&path);
    let (Some(storage), Ok(key)) = (state.storage.get(), ObjectKey::parse(key)) else {
        return poem::Response::builder().status(poem::http::StatusCode::NOT_FOUND).finish();
    };
    let Ok(read) = storage.get(&key, None).await else {
        return poem::Response::builder().status(poem::http::StatusCode::NOT_FOUND).finish();
    };
    let content_type = read.meta.content_type.clone();
    let body = poem::Body::from_bytes_stream(read.body.map(|chunk| chunk.map_err(std::io::Error::other)));
    poem::Response::builder().content_type(content_type).body(body)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], text.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeCdn {
    async fn start() -> Result<FakeCdn> {
        let state = CdnState { storage: Arc::default(), asked: Arc::default() };
        let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().map(std::net::SocketAddr::port))
            .context("the CDN's port")?;
        let app = poem::Route::new().at("/cdn/*path", poem::get(cdn_get)).data(state.clone());
        let task = tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
        });
        Ok(FakeCdn { base: format!("http://127.0.0.1:{port}/cdn/"), storage: state.storage, asked: state.asked, task })
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdn_serves_public_tracks_and_never_private_ones() -> Result<()> {
    let cdn = FakeCdn::start().await?;
    let stack =
        Stack::start(Mode::Distributed, true, &[REDIRECT, ("WAVELINE_STREAM_CDN_BASE", cdn.base.as_str())]).await?;
    let _ = cdn.storage.set(stack.storage.clone());
    let alice = register_and_login(&stack, "alice").await?;
    let public = ready_tone(&stack, &alice, 8.0, &[("title", "For Everyone")]).await?;
    let private = ready_tone(&stack, &alice, 3.0, &[("title", "For Me"), ("visibility", "private")]).await?;
    let client = no_follow();

    // A public stream: the CDN's URL of the object, which serves its bytes.
    let key = rendition_key(&stack, &public, "mp3_128").await?;
    let location = redirect_of(client.get(stack.url(&format!("/v1/tracks/{public}/stream/mp3_128")))).await?;
    ensure!(location == format!("{}{key}", cdn.base), "{location} for {key}");
    ensure!(client.get(&location).send().await?.bytes().await?.to_vec() == stored(&stack, &key).await?);

    // A public HLS playlist names the CDN, and ffmpeg plays through it.
    let master_path = format!("/v1/tracks/{public}/hls/master.m3u8");
    let master = client.get(stack.url(&master_path)).send().await?.text().await?;
    let variant = first_variant(&master)?;
    let playlist = client.get(stack.url(&format!("/v1/tracks/{public}/hls/{variant}"))).send().await?.text().await?;
    ensure!(uris(&playlist).iter().all(|uri| uri.starts_with(&cdn.base)), "{playlist}");
    let before = cdn.asked().len();
    let (_, seconds) = play(stack.url(&master_path), vec![]).await?;
    ensure!((seconds - 8.0).abs() < 0.25, "decoded {seconds} s through the CDN");
    let segments = cdn.asked()[before..].iter().filter(|path| path.ends_with(".m4s")).count();
    ensure!(segments >= 2, "ffmpeg fetched {segments} segments from the CDN");

    // A private track, even to its owner, gets a presigned URL, never the CDN.
    let location =
        redirect_of(client.get(stack.url(&format!("/v1/tracks/{private}/stream/mp3_128"))).bearer_auth(&alice.token))
            .await?;
    ensure!(!location.starts_with(&cdn.base) && Presigned::parse(&location)?.lasts(60), "{location}");
    Ok(())
}

/// `waveline serve` with `env` (and no other `WAVELINE_*` variable): its exit code and stderr,
/// for settings that must stop it before it connects to anything.
fn serve_refused(env: &[(&str, &str)]) -> Result<(Option<i32>, String)> {
    let mut command = Command::new(waveline_bin());
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        command.env_remove(name);
    }
    let output = command.args(["serve"]).envs(env.iter().copied()).output()?;
    Ok((output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn redirect_mode_is_refused_with_the_file_store_and_bad_values_name_the_setting() -> Result<()> {
    let dir = temp_dir()?;
    let files = format!("file://{}", dir.path().display());
    let s3 = "s3://media?endpoint=http://127.0.0.1:9&region=us-east-1";
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("WAVELINE_STORAGE", &files), REDIRECT],
            "WAVELINE_STREAM_MODE: expected `proxy` with file storage: the filesystem store cannot presign URLs, \
             so `redirect` needs S3 storage, got \"redirect\"",
        ),
        (&[("WAVELINE_STORAGE", s3), ("WAVELINE_STREAM_MODE", "sideways")], "expected `proxy` or `redirect`"),
        (
            &[("WAVELINE_STORAGE", s3), REDIRECT, ("WAVELINE_STREAM_REDIRECT_TTL_S", "0")],
            "WAVELINE_STREAM_REDIRECT_TTL_S: expected a whole number from 5 to 3600",
        ),
        (
            &[("WAVELINE_STORAGE", s3), REDIRECT, ("WAVELINE_STREAM_CDN_BASE", "cdn.example.com")],
            "WAVELINE_STREAM_CDN_BASE: expected an http(s) base URL",
        ),
    ];
    for (env, expected) in cases {
        let (code, stderr) = serve_refused(env)?;
        ensure!(code == Some(2), "{env:?}: exit {code:?}: {stderr}");
        ensure!(stderr.contains(expected), "{env:?}: {stderr}");
    }
    Ok(())
}
