//! The social layer over real HTTP, in both configurations: embedded (documents in
//! PostgreSQL) and distributed (RabbitMQ, S3, a separate worker, documents in MongoDB through
//! the wire-protocol stand-in, read directly to prove they live there).
//!
//! One flow covers profiles, follows, blocks, likes, reposts, playlists with private tracks,
//! timestamped comments and the feed; separate tests cover exact counts under concurrency,
//! account deletion leaving nothing behind, the write rate limit and bad input.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, ensure};
use futures::future::try_join_all;
use serde_json::{Value, json};
use waveline_shared::documents::{ActivityObject, CommentOrder, CommentQuery, Documents as _};
use waveline_shared::domain::TrackId;
use waveline_tests::stack::{Mode, Stack, User, json, register_and_login, upload, wait_ready};
use waveline_tests::{audio, temp_dir};

/// Rate limits off: these tests make many accounts and writes on purpose.
const UNLIMITED: &[(&str, &str)] = &[
    ("WAVELINE_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "0"),
];

/// One call: the status and the JSON body (`null` for an empty one).
async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    user: Option<&User>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut request = reqwest::Client::new().request(method, stack.url(path));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("not JSON ({status}): {text}"))?
    };
    Ok((status, value))
}

/// Expects `status`; returns the body.
async fn expect(
    stack: &Stack,
    method: &str,
    path: &str,
    user: Option<&User>,
    body: Option<Value>,
    status: u16,
) -> Result<Value> {
    let (got, value) = call(stack, method, path, user, body).await?;
    ensure!(got == status, "{method} {path}: expected {status}, got {got} {value}");
    Ok(value)
}

/// Expects a `{code, message}` error.
async fn refused(
    stack: &Stack,
    method: &str,
    path: &str,
    user: Option<&User>,
    body: Option<Value>,
    status: u16,
    code: &str,
) -> Result<String> {
    let value = expect(stack, method, path, user, body, status).await?;
    ensure!(value["code"] == code, "{method} {path}: expected code {code}, got {value}");
    Ok(value["message"].as_str().unwrap_or_default().to_owned())
}

/// Uploads a 2 s tone and waits until it is ready; returns its id.
async fn ready_track(stack: &Stack, owner: &User, title: &str, visibility: &str) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("t.wav");
    audio::tone(&path, 2.0, 22050, 1, &[])?;
    let wav = std::fs::read(&path)?;
    let (status, track) =
        upload(stack, owner, &[("title", title), ("visibility", visibility)], ("t.wav", &wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

fn ids(list: &Value, items: &str, field: &str) -> Vec<String> {
    list[items].as_array().map_or_else(Vec::new, |items| {
        items.iter().filter_map(|item| item.pointer(field).and_then(Value::as_str).map(str::to_owned)).collect()
    })
}

/// The feed's `(type, object id)` pairs.
fn feed_items(feed: &Value) -> Vec<(String, String)> {
    feed["activities"].as_array().map_or_else(Vec::new, |items| {
        items
            .iter()
            .map(|a| {
                let object = a["track"]["id"].as_str().or(a["playlist"]["id"].as_str()).unwrap_or_default();
                (a["type"].as_str().unwrap_or_default().to_owned(), object.to_owned())
            })
            .collect()
    })
}

async fn social_flow(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let carol = register_and_login(&stack, "carol").await?;
    let public = ready_track(&stack, &alice, "Night Drive", "public").await?;
    let private = ready_track(&stack, &alice, "Demo", "private").await?;

    // Profiles: a stranger's counts; editing one's own.
    let profile = expect(&stack, "GET", "/v1/users/alice", None, None, 200).await?;
    ensure!(
        profile["track_count"] == 1 && profile["followers_count"] == 0 && profile["display_name"] == "",
        "{profile}"
    );
    ensure!(profile.get("avatar_url").is_none_or(Value::is_null) && profile["created_at"].is_string(), "{profile}");
    refused(&stack, "GET", "/v1/users/nobody", None, None, 404, "not_found").await?;
    refused(&stack, "GET", "/v1/users/NOT%20A%20NAME", None, None, 404, "not_found").await?;
    let edited = json!({"display_name": "Alice A.", "bio": "Synths at night."});
    let profile = expect(&stack, "PATCH", "/v1/me", Some(&alice), Some(edited), 200).await?;
    ensure!(profile["display_name"] == "Alice A." && profile["bio"] == "Synths at night.", "{profile}");
    let message =
        refused(&stack, "PATCH", "/v1/me", Some(&alice), Some(json!({"bio": "x".repeat(4001)})), 400, "invalid_field")
            .await?;
    ensure!(message.contains("bio"), "{message}");

    // Follows: idempotent, never oneself, listed newest first.
    for _ in 0..2 {
        expect(&stack, "PUT", "/v1/me/followings/alice", Some(&bob), None, 204).await?;
    }
    expect(&stack, "PUT", "/v1/me/followings/alice", Some(&carol), None, 204).await?;
    expect(&stack, "PUT", "/v1/me/followings/bob", Some(&carol), None, 204).await?;
    refused(&stack, "PUT", "/v1/me/followings/carol", Some(&carol), None, 400, "cannot_follow_self").await?;
    refused(&stack, "PUT", "/v1/me/followings/nobody", Some(&carol), None, 404, "not_found").await?;
    refused(&stack, "PUT", "/v1/me/followings/alice", None, None, 401, "unauthorized").await?;
    let followers = expect(&stack, "GET", "/v1/users/alice/followers", None, None, 200).await?;
    ensure!(ids(&followers, "users", "/username") == ["carol", "bob"], "{followers}");
    let followings = expect(&stack, "GET", "/v1/users/carol/followings?limit=1", None, None, 200).await?;
    ensure!(ids(&followings, "users", "/username") == ["bob"], "{followings}");
    let cursor = followings["next_cursor"].as_str().context("a second page")?;
    let rest = expect(&stack, "GET", &format!("/v1/users/carol/followings?cursor={cursor}"), None, None, 200).await?;
    ensure!(ids(&rest, "users", "/username") == ["alice"] && rest.get("next_cursor").is_none(), "{rest}");
    refused(&stack, "GET", "/v1/users/carol/followings?cursor=garbage", None, None, 400, "invalid_field").await?;

    // Likes and reposts: counts, the viewer's own marks, and nothing on what one cannot see.
    expect(&stack, "PUT", &format!("/v1/me/likes/tracks/{public}"), Some(&bob), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/likes/tracks/{public}"), Some(&bob), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/reposts/tracks/{public}"), Some(&bob), None, 204).await?;
    refused(&stack, "PUT", &format!("/v1/me/likes/tracks/{private}"), Some(&bob), None, 404, "not_found").await?;
    refused(&stack, "PUT", &format!("/v1/me/reposts/tracks/{public}"), Some(&alice), None, 400, "cannot_repost_own")
        .await?;
    refused(&stack, "PUT", &format!("/v1/me/likes/tracks/{}", TrackId::new()), Some(&bob), None, 404, "not_found")
        .await?;
    let seen = expect(&stack, "GET", &format!("/v1/tracks/{public}"), Some(&bob), None, 200).await?;
    ensure!(seen["likes_count"] == 1 && seen["reposts_count"] == 1 && seen["playback_count"] == 0, "{seen}");
    ensure!(seen["user_liked"] == true && seen["user_reposted"] == true, "{seen}");
    let anonymous = expect(&stack, "GET", &format!("/v1/tracks/{public}"), None, None, 200).await?;
    ensure!(anonymous["likes_count"] == 1 && anonymous.get("user_liked").is_none(), "{anonymous}");
    let by_carol = expect(&stack, "GET", &format!("/v1/tracks/{public}"), Some(&carol), None, 200).await?;
    ensure!(by_carol["user_liked"] == false, "{by_carol}");
    let likes = expect(&stack, "GET", "/v1/users/bob/likes", None, None, 200).await?;
    ensure!(likes["likes"][0]["type"] == "track" && likes["likes"][0]["track"]["id"] == public.as_str(), "{likes}");
    let profile = expect(&stack, "GET", "/v1/users/bob", None, None, 200).await?;
    ensure!(profile["likes_count"] == 1 && profile["reposts_count"] == 1 && profile["followings_count"] == 1);

    // Playlists: another account's private track inside is invisible to others.
    let created = expect(
        &stack,
        "POST",
        "/v1/playlists",
        Some(&alice),
        Some(json!({"title": "Late", "description": "", "visibility": "public", "track_ids": [public, private]})),
        201,
    )
    .await?;
    let playlist = created["id"].as_str().context("playlist id")?.to_owned();
    ensure!(created["track_count"] == 2 && ids(&created, "tracks", "/id") == [public.clone(), private.clone()]);
    let for_bob = expect(&stack, "GET", &format!("/v1/playlists/{playlist}"), Some(&bob), None, 200).await?;
    ensure!(for_bob["track_count"] == 1 && ids(&for_bob, "tracks", "/id") == [public.clone()], "{for_bob}");
    let one = for_bob["tracks"][0]["duration_ms"].as_i64().context("duration")?;
    ensure!(for_bob["duration_ms"] == one, "{for_bob}");
    let listed = expect(&stack, "GET", "/v1/users/alice/playlists", None, None, 200).await?;
    ensure!(listed["playlists"][0]["track_count"] == 1, "{listed}");
    let reordered = json!({"track_ids": [private, public]});
    let after =
        expect(&stack, "PUT", &format!("/v1/playlists/{playlist}/tracks"), Some(&alice), Some(reordered), 200).await?;
    ensure!(ids(&after, "tracks", "/id") == [private.clone(), public.clone()], "{after}");
    refused(
        &stack,
        "PUT",
        &format!("/v1/playlists/{playlist}/tracks"),
        Some(&bob),
        Some(json!({"track_ids": []})),
        403,
        "forbidden",
    )
    .await?;
    let bob_private = json!({"title": "Mine", "visibility": "private", "track_ids": [private]});
    let message = refused(&stack, "POST", "/v1/playlists", Some(&bob), Some(bob_private), 400, "invalid_field").await?;
    ensure!(message.contains("track_ids"), "{message}");
    expect(&stack, "PUT", &format!("/v1/me/likes/playlists/{playlist}"), Some(&carol), None, 204).await?;

    // Comments at timestamps, with replies one level deep.
    let path = format!("/v1/tracks/{public}/comments");
    let first =
        expect(&stack, "POST", &path, Some(&bob), Some(json!({"body": "the drop!", "timestamp_ms": 500})), 201).await?;
    ensure!(first["user"]["username"] == "bob" && first["timestamp_ms"] == 500 && first["reply_to"].is_null());
    let root = first["id"].as_str().context("comment id")?.to_owned();
    let reply = json!({"body": "agreed", "timestamp_ms": 600, "reply_to": root});
    let reply = expect(&stack, "POST", &path, Some(&carol), Some(reply), 201).await?;
    let nested = json!({"body": "same", "timestamp_ms": 1500, "reply_to": reply["id"]});
    let nested = expect(&stack, "POST", &path, Some(&alice), Some(nested), 201).await?;
    ensure!(nested["reply_to"] == root.as_str(), "a reply to a reply attaches to its root: {nested}");
    let message = refused(
        &stack,
        "POST",
        &path,
        Some(&bob),
        Some(json!({"body": "late", "timestamp_ms": one + 1})),
        400,
        "invalid_field",
    )
    .await?;
    ensure!(message.contains("timestamp_ms"), "{message}");
    let long = json!({"body": "x".repeat(1001), "timestamp_ms": 0});
    ensure!(refused(&stack, "POST", &path, Some(&bob), Some(long), 400, "invalid_field").await?.contains("body"));
    refused(
        &stack,
        "POST",
        &format!("/v1/tracks/{private}/comments"),
        Some(&bob),
        Some(json!({"body": "hi", "timestamp_ms": 0})),
        404,
        "not_found",
    )
    .await?;
    let window = expect(&stack, "GET", &format!("{path}?from_ms=400&to_ms=700"), None, None, 200).await?;
    ensure!(ids(&window, "comments", "/body") == ["the drop!", "agreed"], "{window}");
    let newest = expect(&stack, "GET", &format!("{path}?order=newest&limit=1"), None, None, 200).await?;
    ensure!(ids(&newest, "comments", "/body") == ["same"] && newest["next_cursor"].is_string(), "{newest}");
    refused(&stack, "GET", &format!("{path}?cursor=n1.zz"), None, None, 400, "invalid_field").await?;
    let counted = expect(&stack, "GET", &format!("/v1/tracks/{public}"), None, None, 200).await?;
    ensure!(counted["comment_count"] == 3, "{counted}");
    // A playlist counts the comments of the tracks the viewer sees in it, listed or whole.
    let listed = expect(&stack, "GET", "/v1/users/alice/playlists", None, None, 200).await?;
    ensure!(listed["playlists"][0]["comment_count"] == 3, "{listed}");
    let whole = expect(&stack, "GET", &format!("/v1/playlists/{playlist}"), None, None, 200).await?;
    ensure!(whole["comment_count"] == 3, "{whole}");
    refused(
        &stack,
        "DELETE",
        &format!("/v1/comments/{}", nested["id"].as_str().unwrap_or_default()),
        Some(&carol),
        None,
        403,
        "forbidden",
    )
    .await?;

    // The feed: carol follows alice and bob; alice's track (posted, and reposted by bob)
    // appears once, at the repost, and the public playlist once.
    let feed = expect(&stack, "GET", "/v1/me/feed", Some(&carol), None, 200).await?;
    let items = feed_items(&feed);
    ensure!(
        items == [("playlist".to_owned(), playlist.clone()), ("track_repost".to_owned(), public.clone())],
        "{feed}"
    );
    ensure!(feed["activities"][1]["actor"]["username"] == "bob", "{feed}");
    let stream = expect(&stack, "GET", "/v1/users/alice/activities", None, None, 200).await?;
    ensure!(feed_items(&stream) == [("playlist".to_owned(), playlist.clone()), ("track".to_owned(), public.clone())]);

    // In the distributed run the documents are in MongoDB.
    if let Some(mongo) = &stack.mongodb {
        let id: TrackId = public.parse()?;
        let comments = mongo
            .comments(&CommentQuery {
                track_id: id,
                order: CommentOrder::Timestamp,
                from_ms: None,
                to_ms: None,
                cursor: None,
                limit: 10,
            })
            .await?;
        ensure!(comments.comments.len() == 3, "{comments:?}");
        let stored = mongo.database().collection::<mongodb::bson::Document>("activities");
        let count = stored.count_documents(mongodb::bson::doc! {"object_id": public.as_str()}).await?;
        ensure!(count == 2, "the track's activity and bob's repost, in MongoDB: {count}");
        let none = waveline_shared::documents::PgDocuments::new(stack.db.pool.clone());
        ensure!(none.count_comments(id).await? == 0, "no comments in PostgreSQL's tables");
    }

    // A track turned private leaves the feed; back to public, it returns (its activity kept).
    let hide = json!({"visibility": "private"});
    expect(&stack, "PATCH", &format!("/v1/tracks/{public}"), Some(&alice), Some(hide), 200).await?;
    let feed = expect(&stack, "GET", "/v1/me/feed", Some(&carol), None, 200).await?;
    ensure!(feed_items(&feed) == [("playlist".to_owned(), playlist.clone())], "{feed}");
    expect(&stack, "PATCH", &format!("/v1/tracks/{public}"), Some(&alice), Some(json!({"visibility": "public"})), 200)
        .await?;
    // A private track made public is announced once, then: here it had its activity already.
    let stream = expect(&stack, "GET", "/v1/users/alice/activities", None, None, 200).await?;
    ensure!(feed_items(&stream).len() == 2, "{stream}");
    expect(&stack, "PATCH", &format!("/v1/tracks/{private}"), Some(&alice), Some(json!({"visibility": "public"})), 200)
        .await?;
    let stream = expect(&stack, "GET", "/v1/users/alice/activities", None, None, 200).await?;
    ensure!(feed_items(&stream)[0] == ("track".to_owned(), private.clone()), "{stream}");

    // An unfollow empties the next page of that account's items.
    expect(&stack, "DELETE", "/v1/me/followings/bob", Some(&carol), None, 204).await?;
    let feed = expect(&stack, "GET", "/v1/me/feed", Some(&carol), None, 200).await?;
    ensure!(feed["activities"].as_array().is_some_and(|a| a.iter().all(|a| a["actor"]["username"] == "alice")));

    // A repost of a track whose owner the viewer blocks drops out of the feed.
    expect(&stack, "PUT", "/v1/me/followings/bob", Some(&carol), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/reposts/tracks/{private}"), Some(&bob), None, 204).await?;
    let feed = expect(&stack, "GET", "/v1/me/feed", Some(&carol), None, 200).await?;
    ensure!(feed_items(&feed).first() == Some(&("track_repost".to_owned(), private.clone())), "{feed}");
    expect(&stack, "PUT", "/v1/me/blocks/alice", Some(&carol), None, 204).await?;
    let feed = expect(&stack, "GET", "/v1/me/feed", Some(&carol), None, 200).await?;
    ensure!(feed_items(&feed).is_empty(), "nothing of a blocked account's: {feed}");
    let reposts = expect(&stack, "GET", "/v1/users/bob/reposts", Some(&carol), None, 200).await?;
    ensure!(reposts["reposts"].as_array().map(Vec::len) == Some(2), "{reposts}");
    expect(&stack, "DELETE", "/v1/me/blocks/alice", Some(&carol), None, 204).await?;
    expect(&stack, "PUT", "/v1/me/followings/alice", Some(&carol), None, 204).await?;
    expect(&stack, "DELETE", "/v1/me/followings/bob", Some(&carol), None, 204).await?;

    // A block ends the follows both ways and stops follows and comments.
    expect(&stack, "PUT", "/v1/me/followings/bob", Some(&alice), None, 204).await?;
    expect(&stack, "PUT", "/v1/me/blocks/bob", Some(&alice), None, 204).await?;
    let profile = expect(&stack, "GET", "/v1/users/alice", None, None, 200).await?;
    ensure!(profile["followers_count"] == 1 && profile["followings_count"] == 0, "{profile}");
    refused(&stack, "PUT", "/v1/me/followings/alice", Some(&bob), None, 403, "blocked").await?;
    refused(&stack, "POST", &path, Some(&bob), Some(json!({"body": "hey", "timestamp_ms": 1})), 403, "blocked").await?;
    let blocks = expect(&stack, "GET", "/v1/me/blocks", Some(&alice), None, 200).await?;
    ensure!(ids(&blocks, "users", "/username") == ["bob"], "{blocks}");
    let theirs = expect(&stack, "GET", "/v1/me/blocks", Some(&bob), None, 200).await?;
    ensure!(ids(&theirs, "users", "/username").is_empty(), "{theirs}");
    expect(&stack, "DELETE", "/v1/me/blocks/bob", Some(&alice), None, 204).await?;
    expect(&stack, "PUT", "/v1/me/followings/alice", Some(&bob), None, 204).await?;

    // Deleting a comment takes its replies; deleting the track takes its comments.
    expect(&stack, "DELETE", &format!("/v1/comments/{root}"), Some(&bob), None, 204).await?;
    let left = expect(&stack, "GET", &path, None, None, 200).await?;
    ensure!(left["comments"].as_array().is_some_and(Vec::is_empty), "{left}");
    expect(&stack, "POST", &path, Some(&carol), Some(json!({"body": "again", "timestamp_ms": 2})), 201).await?;
    expect(&stack, "DELETE", &format!("/v1/tracks/{public}"), Some(&alice), None, 204).await?;
    let id: TrackId = public.parse()?;
    let store = documents_of(&stack);
    ensure!(store.count_comments(id).await? == 0, "a deleted track's comments are gone");
    let about = store.newest_about(&[ActivityObject::Track(id)], &[user_id(&alice)?, user_id(&bob)?]).await?;
    ensure!(about.is_empty(), "a deleted track's activities are gone: {about:?}");
    let for_carol = expect(&stack, "GET", &format!("/v1/playlists/{playlist}"), Some(&carol), None, 200).await?;
    ensure!(ids(&for_carol, "tracks", "/id") == [private.clone()], "a deleted track drops out: {for_carol}");
    Ok(())
}

/// The stack's document store, to read directly: its MongoDB database, or PostgreSQL's tables.
fn documents_of(stack: &Stack) -> Box<dyn waveline_shared::documents::Documents> {
    match &stack.mongodb {
        Some(mongo) => Box::new(mongo.clone()),
        None => Box::new(waveline_shared::documents::PgDocuments::new(stack.db.pool.clone())),
    }
}

fn user_id(user: &User) -> Result<waveline_shared::domain::UserId> {
    Ok(user.id.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_social_flow_embedded() -> Result<()> {
    social_flow(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_social_flow_distributed() -> Result<()> {
    social_flow(Mode::Distributed).await
}

/// Counts stay exact when many write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_under_concurrency() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, UNLIMITED).await?;
    let artist = register_and_login(&stack, "artist").await?;
    let track = ready_track(&stack, &artist, "Popular", "public").await?;
    let mut fans = Vec::new();
    for chunk in (0..200).collect::<Vec<_>>().chunks(8) {
        let made = try_join_all(chunk.iter().map(|n| {
            let stack = &stack;
            async move { register_and_login(stack, &format!("fan{n:03}")).await }
        }))
        .await?;
        fans.extend(made);
    }

    // 200 accounts like one track at once.
    let like = format!("/v1/me/likes/tracks/{track}");
    try_join_all(fans.iter().map(|fan| expect(&stack, "PUT", &like, Some(fan), None, 204))).await?;
    let seen = expect(&stack, "GET", &format!("/v1/tracks/{track}"), None, None, 200).await?;
    ensure!(seen["likes_count"] == 200, "{seen}");

    // 100 interleaved likes and unlikes by one account leave a count that matches the rows.
    let fan = &fans[0];
    try_join_all((0..100).map(|n| {
        let method = if n % 2 == 0 { "DELETE" } else { "PUT" };
        expect(&stack, method, &like, Some(fan), None, 204)
    }))
    .await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM track_likes WHERE track_id = $1")
        .bind(track.parse::<uuid::Uuid>()?)
        .fetch_one(&stack.db.pool)
        .await?;
    let seen = expect(&stack, "GET", &format!("/v1/tracks/{track}"), None, None, 200).await?;
    ensure!(seen["likes_count"] == rows && (199..=200).contains(&rows), "{seen} against {rows} rows");
    let mine = expect(&stack, "GET", &format!("/v1/tracks/{track}"), Some(fan), None, 200).await?;
    ensure!(mine["user_liked"] == (rows == 200), "{mine} against {rows} rows");

    // 100 concurrent follows give an exact follower count.
    try_join_all(fans[..100].iter().map(|fan| expect(&stack, "PUT", "/v1/me/followings/artist", Some(fan), None, 204)))
        .await?;
    let profile = expect(&stack, "GET", "/v1/users/artist", None, None, 200).await?;
    ensure!(profile["followers_count"] == 100, "{profile}");
    let mut listed = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let page =
            expect(&stack, "GET", &format!("/v1/users/artist/followers?limit=30{cursor}"), None, None, 200).await?;
        for name in ids(&page, "users", "/username") {
            ensure!(listed.insert(name.clone()), "{name} listed twice");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    ensure!(listed.len() == 100, "paging the followers gave {} accounts", listed.len());
    Ok(())
}

/// `DELETE /v1/me` leaves no rows, documents or objects behind.
async fn deletion_leaves_nothing(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, UNLIMITED).await?;
    let gone = register_and_login(&stack, "leaver").await?;
    let stays = register_and_login(&stack, "stayer").await?;
    let theirs = ready_track(&stack, &gone, "Leaving", "public").await?;
    let other = ready_track(&stack, &stays, "Staying", "public").await?;
    expect(&stack, "PUT", "/v1/me/followings/stayer", Some(&gone), None, 204).await?;
    expect(&stack, "PUT", "/v1/me/followings/leaver", Some(&stays), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/likes/tracks/{other}"), Some(&gone), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/reposts/tracks/{other}"), Some(&gone), None, 204).await?;
    expect(&stack, "PUT", &format!("/v1/me/likes/tracks/{theirs}"), Some(&stays), None, 204).await?;
    let comment = json!({"body": "nice", "timestamp_ms": 10});
    expect(&stack, "POST", &format!("/v1/tracks/{other}/comments"), Some(&gone), Some(comment.clone()), 201).await?;
    expect(&stack, "POST", &format!("/v1/tracks/{theirs}/comments"), Some(&stays), Some(comment), 201).await?;
    let made = json!({"title": "Mine", "track_ids": [theirs, other]});
    expect(&stack, "POST", "/v1/playlists", Some(&gone), Some(made), 201).await?;
    ensure!(objects_of(&stack, &theirs).await? > 0, "the track has objects");

    refused(&stack, "DELETE", "/v1/me", Some(&gone), Some(json!({"password": "not it"})), 403, "wrong_password")
        .await?;
    expect(&stack, "DELETE", "/v1/me", Some(&gone), Some(json!({"password": gone.password})), 204).await?;

    refused(&stack, "GET", "/v1/users/leaver", None, None, 404, "not_found").await?;
    refused(&stack, "GET", "/v1/me", Some(&gone), None, 401, "unauthorized").await?;
    let id: uuid::Uuid = gone.id.parse()?;
    for (table, column) in [
        ("users", "id"),
        ("tracks", "owner_id"),
        ("playlists", "owner_id"),
        ("follows", "follower_id"),
        ("follows", "followee_id"),
        ("track_likes", "user_id"),
        ("track_reposts", "user_id"),
        ("sessions", "user_id"),
    ] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE {column} = $1")))
                .bind(id)
                .fetch_one(&stack.db.pool)
                .await?;
        ensure!(rows == 0, "{rows} rows left in {table}.{column}");
    }
    ensure!(objects_of(&stack, &theirs).await? == 0, "objects left behind");
    let store = documents_of(&stack);
    let other_id: TrackId = other.parse()?;
    ensure!(store.count_comments(other_id).await? == 0, "the account's comments are gone");
    ensure!(store.count_comments(theirs.parse()?).await? == 0, "the comments on its tracks are gone");
    let activities = store.actor_activities(gone.id.parse()?, None, 10).await?;
    ensure!(activities.activities.is_empty(), "{activities:?}");
    let seen = expect(&stack, "GET", &format!("/v1/tracks/{other}"), None, None, 200).await?;
    ensure!(seen["likes_count"] == 0 && seen["reposts_count"] == 0 && seen["comment_count"] == 0, "{seen}");
    let profile = expect(&stack, "GET", "/v1/users/stayer", None, None, 200).await?;
    ensure!(profile["followers_count"] == 0 && profile["followings_count"] == 0, "{profile}");
    Ok(())
}

/// How many stored objects a track has (its original, an unfinished upload, its renditions).
async fn objects_of(stack: &Stack, track: &str) -> Result<usize> {
    let mut count = 0;
    for prefix in waveline_shared::storage::track_prefixes(track.parse()?) {
        count += stack.storage.list_prefix(&prefix).await?.len();
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_leaves_nothing_embedded() -> Result<()> {
    deletion_leaves_nothing(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_leaves_nothing_distributed() -> Result<()> {
    deletion_leaves_nothing(Mode::Distributed).await
}

/// Writes past the per-account rate answer 429; bad input answers 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_rate_limited_and_bad_input_is_named() -> Result<()> {
    let stack = Stack::start(
        Mode::Embedded,
        true,
        &[("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "0"), ("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "5")],
    )
    .await?;
    let owner = register_and_login(&stack, "owner").await?;
    let chatty = register_and_login(&stack, "chatty").await?;
    let track = ready_track(&stack, &owner, "Talked about", "public").await?;
    let path = format!("/v1/tracks/{track}/comments");

    // Over-full playlists and malformed ids are refused before anything is written.
    let many: Vec<String> = (0..501).map(|_| TrackId::new().to_string()).collect();
    let message = refused(
        &stack,
        "POST",
        "/v1/playlists",
        Some(&owner),
        Some(json!({"title": "Big", "track_ids": many})),
        400,
        "invalid_field",
    )
    .await?;
    ensure!(message.contains("track_ids") && message.contains("500"), "{message}");
    let twice = json!({"title": "Twice", "track_ids": [track, track]});
    refused(&stack, "POST", "/v1/playlists", Some(&owner), Some(twice), 400, "invalid_field").await?;
    refused(&stack, "POST", "/v1/playlists", Some(&owner), Some(json!({"title": ""})), 400, "invalid_field").await?;
    refused(&stack, "GET", "/v1/playlists/not-an-id", None, None, 404, "not_found").await?;
    refused(&stack, "GET", &format!("/v1/tracks/{}/comments", TrackId::new()), None, None, 404, "not_found").await?;
    refused(&stack, "DELETE", &format!("/v1/comments/{}", TrackId::new()), Some(&owner), None, 404, "not_found")
        .await?;
    refused(&stack, "GET", "/v1/me/feed?cursor=a1.zz", Some(&owner), None, 400, "invalid_field").await?;
    refused(&stack, "GET", &format!("{path}?from_ms=10&to_ms=5"), None, None, 400, "invalid_field").await?;
    let negative = json!({"body": "hm", "timestamp_ms": -1});
    ensure!(
        refused(&stack, "POST", &path, Some(&chatty), Some(negative), 400, "invalid_field")
            .await?
            .contains("timestamp_ms")
    );
    let reply = json!({"body": "hm", "timestamp_ms": 1, "reply_to": TrackId::new().to_string()});
    ensure!(
        refused(&stack, "POST", &path, Some(&chatty), Some(reply), 400, "invalid_field").await?.contains("reply_to")
    );

    // Five writes a minute: the sixth is refused, with when to come back.
    let mut statuses = Vec::new();
    for n in 0..8 {
        let (status, _) =
            call(&stack, "POST", &path, Some(&chatty), Some(json!({"body": format!("#{n}"), "timestamp_ms": n})))
                .await?;
        statuses.push(status);
    }
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    ensure!(statuses.contains(&429) && accepted <= 5, "{statuses:?}");
    let response = reqwest::Client::new()
        .post(stack.url(&path))
        .bearer_auth(&chatty.token)
        .json(&json!({"body": "again", "timestamp_ms": 0}))
        .send()
        .await?;
    ensure!(response.status() == 429 && response.headers().contains_key("retry-after"), "{:?}", response.headers());
    let (_, comments) = json(reqwest::Client::new().get(stack.url(&path)).send().await?).await?;
    ensure!(comments["comments"].as_array().map(Vec::len) == Some(accepted), "{comments}");
    Ok(())
}
