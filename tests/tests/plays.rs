//! Plays, the owner's statistics and the charts, over real HTTP against the real
//! `waveline serve` (and a second replica in the distributed configuration).
//!
//! Counting is asynchronous (batched): a test never waits and then looks for "nothing". It
//! sends the plays that must not count first and a play that must count last; the buffer is
//! written in order, so once the last play shows, the others have been through the counter,
//! and the count is exact.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use waveline_tests::stack::{Mode, Stack, User, json, register_and_login, upload, wait_ready};
use waveline_tests::{audio, temp_dir};

const SETTINGS: &[(&str, &str)] = &[
    ("WAVELINE_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "0"),
    ("WAVELINE_PLAYS_FLUSH_MS", "100"),
];

async fn ready_track(stack: &Stack, owner: &User, visibility: &str) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("t.wav");
    audio::tone(&path, 8.0, 22050, 1, &[])?;
    let wav = std::fs::read(&path)?;
    let (status, track) =
        upload(stack, owner, &[("title", "counted"), ("visibility", visibility)], ("t.wav", &wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

/// One listening request against `base`: its status and body.
async fn listen(
    base: &str,
    path: &str,
    user: Option<&User>,
    agent: &str,
    range: Option<&str>,
    head: bool,
) -> Result<(u16, Vec<u8>)> {
    let client = reqwest::Client::builder().user_agent(agent).build()?;
    let url = format!("{base}{path}");
    let mut request = if head { client.head(url) } else { client.get(url) };
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.bytes().await?.to_vec()))
}

/// The track as `GET /v1/tracks/{id}` shows it to an anonymous listener.
async fn track(base: &str, id: &str) -> Result<Value> {
    let (status, body) = json(reqwest::get(format!("{base}/v1/tracks/{id}")).await?).await?;
    ensure!(status == 200, "{status} {body}");
    Ok(body)
}

/// Waits (at most 15 s) until the track shows `count` plays; fails at once past it.
async fn wait_plays(base: &str, id: &str, count: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = track(base, id).await?["playback_count"].as_i64().context("playback_count")?;
        ensure!(shown <= count, "{shown} plays counted, {count} expected");
        if shown == count {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{shown} plays counted after 15 s, {count} expected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The URIs of a playlist (its non-comment lines).
fn uris(playlist: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(playlist)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

async fn stats(stack: &Stack, user: Option<&User>, id: &str, query: &str) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().get(stack.url(&format!("/v1/tracks/{id}/stats{query}")));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    json(request.send().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_play_counts_once_per_listener_and_the_owner_sees_it_per_day() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, SETTINGS).await?;
    let base = stack.base.clone();
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let carol = register_and_login(&stack, "carol").await?;
    let id = ready_track(&stack, &alice, "public").await?;
    let mp3 = format!("/v1/tracks/{id}/stream/mp3_128");
    ensure!(track(&base, &id).await?["playback_count"] == 0);

    // Bob starts the stream: one play.
    let (status, body) = listen(&base, &mp3, Some(&bob), "player", Some("bytes=0-1023"), false).await?;
    ensure!(status == 206 && body.len() == 1024, "{status}");
    wait_plays(&base, &id, 1).await?;

    // None of these is a new play: the same listener again, a later range (a seek), a HEAD,
    // the owner. Then an anonymous listener's first play, which counts.
    for (user, range, head) in [
        (Some(&bob), Some("bytes=0-"), false),
        (Some(&bob), None, false),
        (Some(&bob), Some("bytes=1024-2047"), false),
        (Some(&carol), Some("bytes=4096-8191"), false),
        (Some(&carol), None, true),
        (Some(&alice), Some("bytes=0-"), false),
    ] {
        let (status, _) = listen(&base, &mp3, user, "player", range, head).await?;
        ensure!(status == 200 || status == 206, "{status}");
    }
    let (status, _) = listen(&base, &mp3, None, "player-a", None, false).await?;
    ensure!(status == 200, "{status}");
    wait_plays(&base, &id, 2).await?;

    // Anonymous listeners are told apart by address and user agent.
    listen(&base, &mp3, None, "player-a", Some("bytes=0-99"), false).await?;
    listen(&base, &mp3, None, "player-b", Some("bytes=0-99"), false).await?;
    wait_plays(&base, &id, 3).await?;

    // The preview counts apart; Opus is the same track, so Bob's play of it is a repeat.
    listen(&base, &format!("/v1/tracks/{id}/stream/opus_64"), Some(&bob), "player", None, false).await?;
    let (status, _) =
        listen(&base, &format!("/v1/tracks/{id}/stream/preview"), Some(&bob), "player", Some("bytes=0-"), false)
            .await?;
    ensure!(status == 206, "{status}");

    // HLS: the master and variant playlists and the init segment are not plays; a variant's
    // first media segment is; its second is not.
    let hls = format!("/v1/tracks/{id}/hls");
    let (status, master) = listen(&base, &format!("{hls}/master.m3u8"), Some(&carol), "hls", None, false).await?;
    ensure!(status == 200, "{status}");
    let variant = uris(&master).into_iter().next().context("a variant")?;
    let dir = variant.rsplit_once('/').map(|(dir, _)| dir.to_owned()).context("variant/playlist")?;
    let (_, playlist) = listen(&base, &format!("{hls}/{variant}"), Some(&carol), "hls", None, false).await?;
    let text = String::from_utf8_lossy(&playlist).into_owned();
    let segments = uris(&playlist);
    ensure!(segments.len() >= 2, "an 8 s track has two segments: {text}");
    let init = text.split("URI=\"").nth(1).and_then(|rest| rest.split('"').next()).context("EXT-X-MAP")?;
    for file in [init, segments[1].as_str(), segments[0].as_str()] {
        let (status, _) = listen(&base, &format!("{hls}/{dir}/{file}"), Some(&carol), "hls", None, false).await?;
        ensure!(status == 200, "{file}: {status}");
    }
    wait_plays(&base, &id, 4).await?;

    // The owner's statistics: today has the four plays and the preview play.
    let (status, shown) = stats(&stack, Some(&alice), &id, "?days=7").await?;
    ensure!(status == 200, "{status} {shown}");
    ensure!(shown["playback_count"] == 4 && shown["preview_playback_count"] == 1, "{shown}");
    let days = shown["days"].as_array().context("days")?;
    ensure!(days.len() == 7, "{shown}");
    let today = chrono::Utc::now().date_naive().to_string();
    let last = days.last().context("today")?;
    ensure!(last["day"] == today.as_str() && last["plays"] == 4 && last["preview_plays"] == 1, "{shown}");
    ensure!(days[..6].iter().all(|day| day["plays"] == 0), "{shown}");

    // Likes, reposts and comments per day beside them.
    for path in [format!("/v1/me/likes/tracks/{id}"), format!("/v1/me/reposts/tracks/{id}")] {
        let response = reqwest::Client::new().put(stack.url(&path)).bearer_auth(&bob.token).send().await?;
        ensure!(response.status() == 204, "{path}: {}", response.status());
    }
    let response = reqwest::Client::new()
        .post(stack.url(&format!("/v1/tracks/{id}/comments")))
        .bearer_auth(&carol.token)
        .json(&serde_json::json!({"body": "the drop", "timestamp_ms": 1500}))
        .send()
        .await?;
    ensure!(response.status() == 201, "{}", response.status());
    let (_, shown) = stats(&stack, Some(&alice), &id, "").await?;
    let days = shown["days"].as_array().context("days")?;
    ensure!(days.len() == 30, "30 days by default: {shown}");
    let last = days.last().context("today")?;
    ensure!(last["likes"] == 1 && last["reposts"] == 1 && last["comments"] == 1, "{shown}");

    // Others get 404 (the track is not theirs), the anonymous 401, bad spans 400.
    let (status, body) = stats(&stack, Some(&bob), &id, "").await?;
    ensure!(status == 404 && body["code"] == "not_found", "{status} {body}");
    let (status, _) = stats(&stack, None, &id, "").await?;
    ensure!(status == 401, "{status}");
    for query in ["?days=0", "?days=366"] {
        let (status, body) = stats(&stack, Some(&alice), &id, query).await?;
        let named = body["message"].as_str().is_some_and(|message| message.contains("days"));
        ensure!(status == 400 && body["code"] == "invalid_field" && named, "{query}: {status} {body}");
    }
    let (status, body) = stats(&stack, Some(&alice), &id, "?days=abc").await?;
    ensure!(status == 400, "{status} {body}");

    // The metrics say what happened to each play.
    let metrics = reqwest::get(stack.url("/metrics")).await?.text().await?;
    ensure!(metrics.contains("waveline_plays_flushed_total"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_plays_add_up_and_a_listener_counts_once_across_them() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, SETTINGS).await?;
    let other = stack.replica().await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let id = ready_track(&stack, &alice, "public").await?;
    let mp3 = format!("/v1/tracks/{id}/stream/mp3_128");

    listen(&stack.base, &mp3, Some(&bob), "player", Some("bytes=0-"), false).await?;
    wait_plays(&stack.base, &id, 1).await?;
    // Bob again, through the other replica (whose memory has never seen him): the database
    // refuses the repeat. An anonymous play after it proves the repeat went through.
    listen(&other.base, &mp3, Some(&bob), "player", Some("bytes=0-"), false).await?;
    listen(&other.base, &mp3, None, "someone", Some("bytes=0-"), false).await?;
    wait_plays(&other.base, &id, 2).await?;

    // Twenty listeners at once, half on each replica.
    let plays = (0..20).map(|n| {
        let base = if n % 2 == 0 { stack.base.clone() } else { other.base.clone() };
        let mp3 = mp3.clone();
        async move { listen(&base, &mp3, None, &format!("listener-{n}"), Some("bytes=0-1"), false).await }
    });
    for (status, _) in futures::future::try_join_all(plays).await? {
        ensure!(status == 206, "{status}");
    }
    wait_plays(&stack.base, &id, 22).await?;
    // The counter equals its hourly rows.
    let (counter, rows): (i64, i64) = sqlx::query_as(
        "SELECT t.playback_count, (SELECT sum(plays)::bigint FROM play_hours WHERE track_id = t.id)
         FROM tracks t WHERE t.id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&stack.db.pool)
    .await?;
    ensure!(counter == 22 && rows == 22, "{counter} {rows}");

    // The plays make the track trend, in this configuration too.
    let run = stack.cli(&["charts", "rebuild", "--json"])?;
    ensure!(run["entries"] == 4, "one track in each of the four charts: {run}");
    let (status, page) = json(reqwest::get(other.url("/v1/charts/trending")).await?).await?;
    ensure!(status == 200, "{status} {page}");
    let first = &page["tracks"][0];
    ensure!(first["rank"] == 1 && first["track"]["id"] == id.as_str(), "{page}");
    ensure!(first["track"]["playback_count"] == 22 && first["score"].as_f64().is_some_and(|s| s > 21.0), "{page}");
    Ok(())
}

/// Inserts a ready track straight into the database (the charts read rows; processing audio
/// for each would only slow the test down).
async fn seeded_track(
    stack: &Stack,
    owner: &str,
    title: &str,
    genre: &str,
    visibility: &str,
    age_days: i32,
) -> Result<String> {
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tracks (id, owner_id, title, genre, visibility, state, revision, ready_revision, created_at)
         SELECT $1, u.id, $3, $4, $5, 'ready', 1, 1, now() - make_interval(days => $6)
         FROM users u WHERE u.username = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(title)
    .bind(genre)
    .bind(visibility)
    .bind(age_days)
    .execute(&stack.db.pool)
    .await?;
    Ok(id.to_string())
}

/// `plays` counted plays of `track`, `hours_ago` hours back.
async fn seeded_plays(stack: &Stack, track: &str, plays: i64, hours_ago: i32) -> Result<()> {
    sqlx::query(
        "INSERT INTO play_hours (track_id, hour, plays)
         VALUES ($1::uuid, date_trunc('hour', now() - make_interval(hours => $3), 'UTC'), $2)",
    )
    .bind(track)
    .bind(plays)
    .bind(hours_ago)
    .execute(&stack.db.pool)
    .await?;
    sqlx::query("UPDATE tracks SET playback_count = playback_count + $2 WHERE id = $1::uuid")
        .bind(track)
        .bind(plays)
        .execute(&stack.db.pool)
        .await?;
    Ok(())
}

async fn chart(stack: &Stack, query: &str) -> Result<Value> {
    let (status, page) = json(reqwest::get(stack.url(query)).await?).await?;
    ensure!(status == 200, "{query}: {status} {page}");
    Ok(page)
}

fn titles(page: &Value) -> Vec<String> {
    page["tracks"].as_array().map_or_else(Vec::new, |tracks| {
        tracks.iter().filter_map(|entry| entry["track"]["title"].as_str().map(str::to_owned)).collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_engagement_gives_the_expected_charts() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, SETTINGS).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let carol = register_and_login(&stack, "carol").await?;
    let mallory = register_and_login(&stack, "mallory").await?;

    // Trending decays by age (half-life 48 h) over 7 days; top charts count within their period.
    let hot = seeded_track(&stack, "alice", "hot", "House", "public", 2).await?;
    seeded_plays(&stack, &hot, 120, 1).await?; // trending ≈ 116.5–118.3
    let reposted = seeded_track(&stack, "alice", "reposted", "Techno", "public", 3).await?;
    let slow = seeded_track(&stack, "alice", "slow", "house", "public", 10).await?;
    seeded_plays(&stack, &slow, 300, 6 * 24).await?; // trending 37.5; top week 300
    let month = seeded_track(&stack, "alice", "month", "ambient", "public", 25).await?;
    seeded_plays(&stack, &month, 60, 20 * 24).await?; // beyond trending's 7 days
    let talked = seeded_track(&stack, "alice", "talked", "ambient", "public", 1).await?;
    sqlx::query(
        "INSERT INTO comment_hours (track_id, hour, comments) VALUES ($1::uuid, date_trunc('hour', now(), 'UTC'), 10)",
    )
    .bind(&talked)
    .execute(&stack.db.pool)
    .await?;
    let old = seeded_track(&stack, "alice", "old", "", "public", 40).await?;
    seeded_plays(&stack, &old, 500, 35 * 24).await?; // too old for trending; first of all time
    let hidden = seeded_track(&stack, "alice", "hidden", "House", "private", 1).await?;
    seeded_plays(&stack, &hidden, 1000, 1).await?;
    let banned = seeded_track(&stack, "mallory", "banned", "House", "public", 1).await?;
    seeded_plays(&stack, &banned, 1000, 1).await?;
    sqlx::query("UPDATE users SET suspended_at = now() WHERE username = 'mallory'").execute(&stack.db.pool).await?;
    let _ = mallory;
    // Two tracks with the same score: their order is their ids'.
    let mut twins = Vec::new();
    for title in ["twin-a", "twin-b"] {
        let twin = seeded_track(&stack, "alice", title, "", "public", 1).await?;
        seeded_plays(&stack, &twin, 10, 2).await?;
        twins.push((twin, title));
    }
    twins.sort();
    // Two reposts now: 2 × 50, plus 2 × 0.25 of all time.
    for user in [&bob, &carol] {
        let response = reqwest::Client::new()
            .put(stack.url(&format!("/v1/me/reposts/tracks/{reposted}")))
            .bearer_auth(&user.token)
            .send()
            .await?;
        ensure!(response.status() == 204, "{}", response.status());
    }

    // Before any computation the charts are empty and say so.
    let page = chart(&stack, "/v1/charts/trending").await?;
    ensure!(titles(&page).is_empty() && page.get("computed_at").is_none(), "{page}");
    let run = stack.cli(&["charts", "rebuild", "--json"])?;
    ensure!(run["entries"].as_u64().is_some_and(|n| n > 0), "{run}");

    let twin_order: Vec<String> = twins.iter().map(|(_, title)| (*title).to_owned()).collect();
    let mut expected = vec!["hot", "reposted", "talked", "slow"].into_iter().map(str::to_owned).collect::<Vec<_>>();
    expected.extend(twin_order.clone());
    let page = chart(&stack, "/v1/charts/trending").await?;
    ensure!(titles(&page) == expected, "trending: {:?}", titles(&page));
    ensure!(page["computed_at"].is_string(), "{page}");
    let ranks: Vec<i64> =
        page["tracks"].as_array().context("tracks")?.iter().filter_map(|t| t["rank"].as_i64()).collect();
    ensure!(ranks == (1..=expected.len() as i64).collect::<Vec<_>>(), "{ranks:?}");
    let score = page["tracks"][1]["score"].as_f64().context("score")?;
    ensure!((score - 100.5).abs() < 0.1, "two fresh reposts score about 100.5, got {score}");

    // Pages of two, with the cursor, make up the same order and ranks.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("/v1/charts/trending?limit=2&cursor={cursor}"),
            None => "/v1/charts/trending?limit=2".to_owned(),
        };
        let page = chart(&stack, &query).await?;
        let first = page["tracks"][0]["rank"].as_i64().context("rank")?;
        ensure!(first == paged.len() as i64 + 1, "a page starts at rank {first}");
        paged.extend(titles(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ensure!(paged == expected, "paged: {paged:?}");

    // A genre, whatever its case.
    let page = chart(&stack, "/v1/charts/trending?genre=HOUSE").await?;
    ensure!(titles(&page) == ["hot", "slow"], "house: {:?}", titles(&page));

    let mut week = vec!["slow", "hot", "reposted", "talked"].into_iter().map(str::to_owned).collect::<Vec<_>>();
    week.extend(twin_order.clone());
    ensure!(titles(&chart(&stack, "/v1/charts/top").await?) == week, "top week");
    let mut month_order =
        vec!["slow", "hot", "reposted", "month", "talked"].into_iter().map(str::to_owned).collect::<Vec<_>>();
    month_order.extend(twin_order.clone());
    ensure!(titles(&chart(&stack, "/v1/charts/top?period=month").await?) == month_order, "top month");
    let all = titles(&chart(&stack, "/v1/charts/top?period=all").await?);
    ensure!(all.first().map(String::as_str) == Some("old") && all.len() == 8, "top all: {all:?}");

    // A track made private leaves every chart at once, without a new computation.
    let response = reqwest::Client::new()
        .patch(stack.url(&format!("/v1/tracks/{hot}")))
        .bearer_auth(&alice.token)
        .json(&serde_json::json!({"visibility": "private"}))
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    let page = chart(&stack, "/v1/charts/trending").await?;
    ensure!(!titles(&page).contains(&"hot".to_owned()) && page["tracks"][0]["rank"] == 1, "{page}");

    // A viewer in a block with an account does not see its tracks; others still do.
    let response = reqwest::Client::new().put(stack.url("/v1/me/blocks/alice")).bearer_auth(&bob.token).send().await?;
    ensure!(response.status() == 204, "{}", response.status());
    let (status, page) =
        json(reqwest::Client::new().get(stack.url("/v1/charts/trending")).bearer_auth(&bob.token).send().await?)
            .await?;
    ensure!(status == 200 && titles(&page).is_empty(), "{status} {page}");
    let (status, page) =
        json(reqwest::Client::new().get(stack.url("/v1/charts/trending")).bearer_auth(&carol.token).send().await?)
            .await?;
    ensure!(status == 200 && titles(&page).len() == expected.len() - 1, "{status} {page}");

    // Bad input.
    for (query, code) in [
        ("/v1/charts/trending?limit=0", "invalid_field"),
        ("/v1/charts/trending?limit=101", "invalid_field"),
        ("/v1/charts/trending?cursor=nonsense", "invalid_cursor"),
    ] {
        let (status, body) = json(reqwest::get(stack.url(query)).await?).await?;
        ensure!(status == 400 && body["code"] == code, "{query}: {status} {body}");
    }
    let (status, body) = json(reqwest::get(stack.url("/v1/charts/top?period=year")).await?).await?;
    ensure!(status == 400 && body["code"].is_string(), "{status} {body}");
    let long = "x".repeat(101);
    let (status, body) = json(reqwest::get(stack.url(&format!("/v1/charts/trending?genre={long}"))).await?).await?;
    ensure!(status == 400 && body["code"] == "invalid_field", "{status} {body}");
    Ok(())
}

/// The Prometheus counter `waveline_charts_ticks_total{outcome="…"}` of a process.
fn ticks(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("waveline_charts_ticks_total") && line.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_schedule_compute_each_tick_once() -> Result<()> {
    let settings: Vec<(&str, &str)> = SETTINGS.iter().copied().chain([("WAVELINE_CHARTS_INTERVAL_S", "1")]).collect();
    let stack = Stack::start(Mode::Embedded, false, &settings).await?;
    let other = stack.replica().await?;
    let base = [stack.base.clone(), other.base.clone()];
    // Both processes tick every second; wait until each has ticked at least five times.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (computed, skipped) = loop {
        let mut computed = 0;
        let mut skipped = 0;
        let mut ticked = Vec::new();
        for base in &base {
            let metrics = reqwest::get(format!("{base}/metrics")).await?.text().await?;
            let (c, s) = (ticks(&metrics, "computed"), ticks(&metrics, "done") + ticks(&metrics, "busy"));
            ensure!(ticks(&metrics, "failed") == 0, "a tick failed: {metrics}");
            computed += c;
            skipped += s;
            ticked.push(c + s);
        }
        if ticked.iter().all(|n| *n >= 5) {
            break (computed, skipped);
        }
        ensure!(Instant::now() < deadline, "the processes ticked {ticked:?} times in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every computation wrote its own tick, and no tick was computed twice.
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT tick, computed_by FROM chart_runs ORDER BY tick").fetch_all(&stack.db.pool).await?;
    let computed_now: (i64,) = sqlx::query_as("SELECT count(*) FROM chart_runs").fetch_one(&stack.db.pool).await?;
    ensure!(
        computed_now.0 as u64 >= computed && computed_now.0 as u64 <= computed + 2,
        "{computed} computations counted, {} ticks recorded: {rows:?}",
        computed_now.0
    );
    ensure!(skipped > 0, "two processes on one schedule: one of them skips ticks");
    Ok(())
}
