//! `GET /v1/search` over real HTTP.
//!
//! The flow runs in both configurations with tracks (and an avatar) uploaded and processed
//! for real. The ranking, prefix, accent, typo, privacy and paging tests need many tracks in
//! exact shapes: their accounts are registered through the API, and their tracks are written
//! straight into the database as a finished job leaves them (`ready`, a ready revision;
//! `processing` for the unfinished one), so the search reads the same rows and generated
//! columns an upload would have produced.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_shared::domain::TrackId;
use waveline_tests::images::{fetch, jpeg, picture, put_image, wait_image};
use waveline_tests::stack::{Mode, Stack, User, register_and_login, upload, wait_ready};
use waveline_tests::{audio, temp_dir};

const UNLIMITED: &[(&str, &str)] = &[
    ("WAVELINE_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "0"),
];

/// One call: the status and the JSON body.
async fn call(
    stack: &Stack,
    method: &str,
    path: &str,
    user: Option<&User>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().request(reqwest::Method::from_bytes(method.as_bytes())?, stack.url(path));
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
        serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?
    };
    Ok((status, value))
}

/// `GET /v1/search` with these query parameters: the status and the body.
async fn search_raw(stack: &Stack, params: &[(&str, &str)], user: Option<&User>) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().get(stack.url("/v1/search")).query(params);
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?))
}

/// A search that must answer 200: the page.
async fn search(stack: &Stack, kind: &str, q: &str, user: Option<&User>) -> Result<Value> {
    let (status, page) = search_raw(stack, &[("q", q), ("type", kind)], user).await?;
    ensure!(status == 200, "search {kind} {q:?}: {status} {page}");
    Ok(page)
}

/// A field of each item of a page's list.
fn field(page: &Value, list: &str, name: &str) -> Vec<String> {
    page[list]
        .as_array()
        .map_or_else(Vec::new, |items| items.iter().filter_map(|item| item[name].as_str().map(str::to_owned)).collect())
}

fn titles(page: &Value) -> Vec<String> {
    field(page, "tracks", "title")
}

/// A track of `owner`'s, written as a finished job leaves it.
struct NewTrack<'a> {
    title: &'a str,
    tags: &'a [&'a str],
    genre: Option<&'a str>,
    description: &'a str,
    visibility: &'a str,
    ready: bool,
}

const PLAIN: NewTrack<'static> =
    NewTrack { title: "", tags: &[], genre: None, description: "", visibility: "public", ready: true };

async fn insert_track(stack: &Stack, owner: &User, track: NewTrack<'_>) -> Result<String> {
    let id = TrackId::new();
    let owner: uuid::Uuid = owner.id.parse()?;
    let (state, stage, ready_revision) =
        if track.ready { ("ready", None, Some(1)) } else { ("processing", Some("encoding"), None) };
    sqlx::query(
        "INSERT INTO tracks (id, owner_id, title, description, genre, tags, visibility, state, stage, revision,
                             ready_revision, duration_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, 2000)",
    )
    .bind(id.0)
    .bind(owner)
    .bind(track.title)
    .bind(track.description)
    .bind(track.genre)
    .bind(track.tags.iter().map(|t| (*t).to_owned()).collect::<Vec<String>>())
    .bind(track.visibility)
    .bind(state)
    .bind(stage)
    .bind(ready_revision)
    .execute(&stack.db.pool)
    .await?;
    Ok(id.to_string())
}

async fn display_name(stack: &Stack, user: &User, name: &str) -> Result<()> {
    let (status, body) = call(stack, "PATCH", "/v1/me", Some(user), Some(json!({"display_name": name}))).await?;
    ensure!(status == 200, "{status} {body}");
    Ok(())
}

async fn playlist(stack: &Stack, owner: &User, title: &str, visibility: &str, tracks: &[&str]) -> Result<String> {
    let body = json!({"title": title, "visibility": visibility, "track_ids": tracks});
    let (status, created) = call(stack, "POST", "/v1/playlists", Some(owner), Some(body)).await?;
    ensure!(status == 201, "{status} {created}");
    Ok(created["id"].as_str().context("playlist id")?.to_owned())
}

/// Uploads a 2 s tone with this metadata and waits until it is ready; returns its id.
async fn ready_upload(stack: &Stack, owner: &User, fields: &[(&str, &str)]) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("t.wav");
    audio::tone(&path, 2.0, 22050, 1, &[])?;
    let wav = std::fs::read(&path)?;
    let (status, track) = upload(stack, owner, fields, ("t.wav", &wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

async fn flow(mode: Mode) -> Result<()> {
    let stack = Stack::start(mode, true, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    display_name(&stack, &alice, "Beyoncé Fan Club").await?;
    let avatar = jpeg(&picture(64, 64, |x, _| if x < 32 { [220, 20, 20] } else { [20, 20, 220] }))?;
    let (status, accepted) = put_image(&stack, &alice, "/v1/me/avatar", &avatar).await?;
    ensure!(status == 202, "{status} {accepted}");
    let halo = ready_upload(
        &stack,
        &alice,
        &[("title", "Halo (Beyoncé cover)"), ("tags", "pop,cover"), ("genre", "R&B"), ("description", "Recorded live")],
    )
    .await?;
    let demo = ready_upload(&stack, &alice, &[("title", "Halo demo"), ("visibility", "private")]).await?;
    let list = playlist(&stack, &alice, "Covers of Beyoncé", "public", &[&halo, &demo]).await?;
    bob_likes(&stack, &bob, &halo).await?;

    // Tracks, in the view of GET /v1/tracks/{id}: counts and the viewer's marks included.
    let found = search(&stack, "tracks", "beyonce", Some(&bob)).await?;
    ensure!(field(&found, "tracks", "id") == [halo.as_str()], "{found}");
    let track = &found["tracks"][0];
    ensure!(track["likes_count"] == 1 && track["user_liked"] == true && track["state"] == "ready", "{track}");
    ensure!(track["stream_urls"]["mp3_128"].is_string() && track["owner"]["username"] == "alice", "{track}");
    ensure!(found.get("next_cursor").is_none() && found.get("users").is_none(), "{found}");
    // As typed, by tag, by genre, by description; the private demo for its owner alone.
    for q in ["hal", "Halo cov", "pop", "r&b", "recorded live"] {
        ensure!(field(&search(&stack, "tracks", q, Some(&bob)).await?, "tracks", "id") == [halo.as_str()], "{q}");
    }
    let mine = search(&stack, "tracks", "halo", Some(&alice)).await?;
    ensure!(field(&mine, "tracks", "id").iter().collect::<BTreeSet<_>>() == [&halo, &demo].into(), "{mine}");
    ensure!(field(&search(&stack, "tracks", "halo", None).await?, "tracks", "id") == [halo.as_str()]);

    // Accounts, in the view of GET /v1/users/{username}; playlists, as their lists show them.
    let users = search(&stack, "users", "beyonce fan", None).await?;
    ensure!(field(&users, "users", "username") == ["alice"], "{users}");
    ensure!(users["users"][0]["track_count"] == 1 && users["users"][0]["display_name"] == "Beyoncé Fan Club");
    // With the avatar: the whole profile view, to the byte.
    let profile = wait_image(&stack, None, "/v1/users/alice", "avatar_state").await?;
    ensure!(profile["avatar_state"] == "ready" && profile["avatar_url"].is_string(), "{profile}");
    let users = search(&stack, "users", "beyonce fan", None).await?;
    ensure!(users["users"][0] == profile, "search: {users}\nGET /v1/users/alice: {profile}");
    let (status, _, bytes) = fetch(&stack, profile["avatar_url"].as_str().context("avatar_url")?).await?;
    ensure!(status == 200 && bytes.starts_with(&[0xff, 0xd8, 0xff]), "the avatar is not served: {status}");
    let lists = search(&stack, "playlists", "covers", Some(&bob)).await?;
    ensure!(field(&lists, "playlists", "id") == [list.as_str()], "{lists}");
    ensure!(lists["playlists"][0]["track_count"] == 1, "bob sees one of its tracks: {lists}");
    let lists = search(&stack, "playlists", "covers", Some(&alice)).await?;
    ensure!(lists["playlists"][0]["track_count"] == 2, "{lists}");
    Ok(())
}

async fn bob_likes(stack: &Stack, bob: &User, track: &str) -> Result<()> {
    let (status, body) = call(stack, "PUT", &format!("/v1/me/likes/tracks/{track}"), Some(bob), None).await?;
    ensure!(status == 204, "{status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_flow_embedded() -> Result<()> {
    flow(Mode::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_flow_distributed() -> Result<()> {
    flow(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_ranks_matches_prefixes_folds_accents_and_tolerates_typos() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let deadmau5 = register_and_login(&stack, "deadmau5").await?;
    display_name(&stack, &deadmau5, "Joel Zimmerman").await?;

    // Ranking: a title match above a tag or genre match, above a description match; ties
    // newest first.
    let by_description = insert_track(
        &stack,
        &alice,
        NewTrack { title: "Northern Lights", description: "Recorded under the aurora", ..PLAIN },
    )
    .await?;
    let by_tag = insert_track(&stack, &alice, NewTrack { title: "Polar Night", tags: &["aurora"], ..PLAIN }).await?;
    let by_genre =
        insert_track(&stack, &alice, NewTrack { title: "Borealis", genre: Some("Aurora Wave"), ..PLAIN }).await?;
    let older_title = insert_track(&stack, &alice, NewTrack { title: "Aurora", ..PLAIN }).await?;
    let newer_title = insert_track(&stack, &alice, NewTrack { title: "Aurora", ..PLAIN }).await?;
    let ranked = search(&stack, "tracks", "aurora", None).await?;
    let ids = field(&ranked, "tracks", "id");
    ensure!(ids.len() == 5, "{ranked}");
    ensure!(ids[..2] == [newer_title.as_str(), older_title.as_str()], "title matches first, newest first: {ranked}");
    ensure!(
        ids[2..4].iter().collect::<BTreeSet<_>>() == [&by_tag, &by_genre].into() && ids[4] == by_description,
        "tags and genre, then the description: {ranked}"
    );

    // Prefix of the last word, every word needed.
    insert_track(&stack, &alice, NewTrack { title: "Daft Punk — Around the World", ..PLAIN }).await?;
    insert_track(&stack, &alice, NewTrack { title: "Daft Beats", ..PLAIN }).await?;
    insert_track(&stack, &alice, NewTrack { title: "Punk Rock Pun", ..PLAIN }).await?;
    for q in ["daft pun", "Daft P", "DAFT PUNK", "daft-punk", "around the wor"] {
        ensure!(titles(&search(&stack, "tracks", q, None).await?) == ["Daft Punk — Around the World"], "{q}");
    }
    // The words in any order.
    ensure!(titles(&search(&stack, "tracks", "punk daft", None).await?) == ["Daft Punk — Around the World"]);

    // Accents folded, both ways.
    insert_track(&stack, &alice, NewTrack { title: "Beyoncé Live", ..PLAIN }).await?;
    insert_track(&stack, &alice, NewTrack { title: "Beyonce Karaoke", ..PLAIN }).await?;
    insert_track(&stack, &alice, NewTrack { title: "Sigur Rós — Hoppípolla", ..PLAIN }).await?;
    for q in ["beyonce", "beyoncé", "BEYONCÉ", "Beyonce"] {
        let found: BTreeSet<String> = titles(&search(&stack, "tracks", q, None).await?).into_iter().collect();
        ensure!(found == ["Beyonce Karaoke".to_owned(), "Beyoncé Live".to_owned()].into(), "{q}: {found:?}");
    }
    ensure!(titles(&search(&stack, "tracks", "sigur ros hoppipolla", None).await?) == ["Sigur Rós — Hoppípolla"]);

    // Typos: when the words match nothing, similar titles and names.
    let typo = titles(&search(&stack, "tracks", "beyonse", None).await?);
    ensure!(typo.len() == 2 && typo.iter().all(|t| t.starts_with("Beyonc")), "{typo:?}");
    ensure!(titles(&search(&stack, "tracks", "daft pumk", None).await?)[0] == "Daft Punk — Around the World");
    ensure!(field(&search(&stack, "users", "deadmau6", None).await?, "users", "username") == ["deadmau5"]);
    ensure!(field(&search(&stack, "users", "joel zimerman", None).await?, "users", "username") == ["deadmau5"]);
    // Two letters are too few to be similar to anything.
    ensure!(titles(&search(&stack, "tracks", "zq", None).await?).is_empty());
    // Accounts by the beginning of their username or display name.
    ensure!(field(&search(&stack, "users", "deadm", None).await?, "users", "username") == ["deadmau5"]);
    ensure!(field(&search(&stack, "users", "joel", None).await?, "users", "username") == ["deadmau5"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_shows_each_viewer_only_what_they_may_see() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let carol = register_and_login(&stack, "carol").await?;
    let mallory = register_and_login(&stack, "mallory").await?;
    for (user, name) in
        [(&alice, "Alice Nebula"), (&bob, "Bob Nebula"), (&carol, "Carol Nebula"), (&mallory, "Mallory Nebula")]
    {
        display_name(&stack, user, name).await?;
    }
    let public = insert_track(&stack, &alice, NewTrack { title: "Nebula public", ..PLAIN }).await?;
    let private =
        insert_track(&stack, &alice, NewTrack { title: "Nebula private", visibility: "private", ..PLAIN }).await?;
    let processing =
        insert_track(&stack, &alice, NewTrack { title: "Nebula processing", ready: false, ..PLAIN }).await?;
    let carols = insert_track(&stack, &carol, NewTrack { title: "Nebula by carol", ..PLAIN }).await?;
    let mallorys = insert_track(&stack, &mallory, NewTrack { title: "Nebula by mallory", ..PLAIN }).await?;
    let alices_list = playlist(&stack, &alice, "Nebula list", "public", &[&public, &private]).await?;
    let secret_list = playlist(&stack, &alice, "Nebula secret list", "private", &[&public]).await?;
    let carols_list = playlist(&stack, &carol, "Nebula carol list", "public", &[&carols]).await?;

    // Carol blocks bob; mallory is suspended.
    let (status, _) = call(&stack, "PUT", "/v1/me/blocks/bob", Some(&carol), None).await?;
    ensure!(status == 204);
    sqlx::query("UPDATE users SET suspended_at = now() WHERE username = 'mallory'").execute(&stack.db.pool).await?;

    let ids = |page: Value, list: &str| field(&page, list, "id").into_iter().collect::<BTreeSet<String>>();
    let set = |items: &[&String]| items.iter().map(|s| (*s).clone()).collect::<BTreeSet<String>>();
    // Anonymous: public and ready tracks of accounts in good standing.
    ensure!(ids(search(&stack, "tracks", "nebula", None).await?, "tracks") == set(&[&public, &carols]));
    // The owner: their own private and unfinished tracks too.
    ensure!(
        ids(search(&stack, "tracks", "nebula", Some(&alice)).await?, "tracks")
            == set(&[&public, &private, &processing, &carols])
    );
    // Bob and carol do not see each other, either way; the block hides the account as well.
    ensure!(ids(search(&stack, "tracks", "nebula", Some(&bob)).await?, "tracks") == set(&[&public]));
    let for_carol = ids(search(&stack, "tracks", "nebula", Some(&carol)).await?, "tracks");
    ensure!(for_carol == set(&[&public, &carols]), "{for_carol:?}");
    let users = |page: Value| field(&page, "users", "username");
    let mut all = users(search(&stack, "users", "nebula", None).await?);
    all.sort();
    ensure!(all == ["alice", "bob", "carol"], "the suspended account is hidden: {all:?}");
    let mut for_bob = users(search(&stack, "users", "nebula", Some(&bob)).await?);
    for_bob.sort();
    ensure!(for_bob == ["alice", "bob"], "{for_bob:?}");
    ensure!(!users(search(&stack, "users", "nebula", Some(&carol)).await?).contains(&"bob".to_owned()));
    // Others never find a private track, even by the words only it has; nor a suspended
    // account's.
    ensure!(ids(search(&stack, "tracks", "nebula private", Some(&bob)).await?, "tracks").is_empty());
    ensure!(ids(search(&stack, "tracks", "nebula mallory", Some(&alice)).await?, "tracks").is_empty());
    ensure!(!ids(search(&stack, "tracks", "nebula", Some(&alice)).await?, "tracks").contains(&mallorys));

    // Playlists: a private one for its owner only; a blocked owner's hidden.
    ensure!(ids(search(&stack, "playlists", "nebula", None).await?, "playlists") == set(&[&alices_list, &carols_list]));
    ensure!(ids(search(&stack, "playlists", "nebula", Some(&bob)).await?, "playlists") == set(&[&alices_list]));
    ensure!(
        ids(search(&stack, "playlists", "nebula", Some(&alice)).await?, "playlists")
            == set(&[&alices_list, &secret_list, &carols_list])
    );
    // A playlist's counts follow the playlist rules: others do not count alice's private track.
    let page = search(&stack, "playlists", "nebula list", None).await?;
    ensure!(page["playlists"][0]["id"] == alices_list.as_str() && page["playlists"][0]["track_count"] == 1, "{page}");
    // Unblocked, they see each other again.
    let (status, _) = call(&stack, "DELETE", "/v1/me/blocks/bob", Some(&carol), None).await?;
    ensure!(status == 204);
    ensure!(ids(search(&stack, "tracks", "nebula", Some(&bob)).await?, "tracks") == set(&[&public, &carols]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_are_complete_and_stable_and_bad_input_is_refused() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    // 45 matches of three ranks (title, tag, description), many tied.
    let mut all = BTreeSet::new();
    for n in 0..45 {
        let title = format!("{} {n}", ["Echo", "Track", "Song"][n % 3]);
        let track = match n % 3 {
            0 => NewTrack { title: &title, ..PLAIN },
            1 => NewTrack { title: &title, tags: &["echo"], ..PLAIN },
            _ => NewTrack { title: &title, description: "an echo", ..PLAIN },
        };
        all.insert(insert_track(&stack, &alice, track).await?);
    }
    insert_track(&stack, &alice, NewTrack { title: "Unrelated", ..PLAIN }).await?;
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("q", "echo"), ("limit", "20")];
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor.as_str()));
        }
        let (status, page) = search_raw(&stack, &params, None).await?;
        ensure!(status == 200, "{status} {page}");
        pages.push(field(&page, "tracks", "id"));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
        ensure!(pages.len() < 10, "the pages never end");
    }
    ensure!(pages.iter().map(Vec::len).collect::<Vec<_>>() == [20, 20, 5], "{pages:?}");
    let listed: Vec<String> = pages.concat();
    ensure!(listed.iter().cloned().collect::<BTreeSet<_>>() == all && listed.len() == 45, "each once: {listed:?}");
    // The ranks hold across the pages: the 15 title matches, then the 30 others.
    let titles_first: BTreeSet<String> = listed[..15].iter().cloned().collect();
    let echo_titled: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM tracks WHERE title LIKE 'Echo %'").fetch_all(&stack.db.pool).await?;
    ensure!(titles_first == echo_titled.into_iter().collect(), "title matches first");
    // The same walk again gives the same pages.
    let (_, first) = search_raw(&stack, &[("q", "echo"), ("limit", "20")], None).await?;
    ensure!(field(&first, "tracks", "id") == pages[0]);
    let second_cursor = first["next_cursor"].as_str().context("a cursor")?.to_owned();
    let (_, second) =
        search_raw(&stack, &[("q", "echo"), ("limit", "20"), ("cursor", second_cursor.as_str())], None).await?;
    ensure!(field(&second, "tracks", "id") == pages[1]);
    // A cursor belongs to its search.
    for (q, kind) in [("ech", "tracks"), ("echo", "users")] {
        let (status, body) =
            search_raw(&stack, &[("q", q), ("type", kind), ("cursor", second_cursor.as_str())], None).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{q} {kind}: {status} {body}");
    }

    // Queries that are tsquery syntax, or nothing but it, are words or nothing: never 500.
    let long_hostile = "&|!:*'\"\\()<->".repeat(14);
    for q in [
        "echo & !",
        "echo | 2",
        "!echo",
        "echo:*",
        "'echo'",
        "\"echo\"",
        "echo\\",
        "(echo",
        "echo)",
        "e:* & f",
        "<->",
        "echo <-> 4",
        "\\'",
        "'''",
        "&&&",
        "!!!",
        ":",
        "*",
        "()",
        "echo\u{0}",
        "\u{202e}echo",
        "ŉ",
        "ʻecho",
        "ʻ",
        "ʻʻʻ",
        "%",
        "_",
        "echo%",
        "\u{feff}",
        "🎵 echo",
        "東京",
        long_hostile.as_str(),
    ] {
        let (status, body) = search_raw(&stack, &[("q", q)], None).await?;
        ensure!(status == 200 && body["tracks"].is_array(), "{q:?}: {status} {body}");
        for kind in ["users", "playlists"] {
            let (status, body) = search_raw(&stack, &[("q", q), ("type", kind)], None).await?;
            ensure!(status == 200 && body[kind].is_array(), "{q:?} {kind}: {status} {body}");
        }
    }
    let (_, body) = search_raw(&stack, &[("q", "echo & !")], None).await?;
    ensure!(body["tracks"].as_array().is_some_and(|t| t.len() == 20), "the words of a hostile query still count");

    // Bad input.
    let too_long = "a".repeat(201);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("q", "")],
        vec![("q", "   \t ")],
        vec![("q", too_long.as_str())],
        vec![("q", "echo"), ("type", "albums")],
        vec![("q", "echo"), ("cursor", "garbage")],
        vec![("q", "echo"), ("cursor", "w3f800000000000000000000000000000000000000.AAAA")],
        vec![("q", "echo"), ("limit", "0")],
        vec![("q", "echo"), ("limit", "101")],
    ];
    for params in cases {
        let (status, body) = search_raw(&stack, &params, None).await?;
        ensure!(status == 400 && body["code"] == "invalid_field", "{params:?}: {status} {body}");
    }
    // 200 characters are allowed.
    let (status, _) = search_raw(&stack, &[("q", "é".repeat(200).as_str())], None).await?;
    ensure!(status == 200);
    Ok(())
}
