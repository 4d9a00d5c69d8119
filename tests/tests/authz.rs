//! The authorization matrix: every operation of the OpenAPI document, called as anonymous,
//! another user, the owner and an admin, on a public and a private track, against the
//! expected status written below. An operation in the document without a row fails the test,
//! and so does a row the document no longer has.
//!
//! "Owner" is the account the operation acts on: the track's owner for track routes, the
//! uploader for direct uploads, the target account for the admin's user routes. Rows run in
//! the table's order, each role in turn (owner last, unless the row says otherwise), because
//! some cells change what later ones see: the owner's `DELETE` removes the track, a logout
//! ends a session (the runner logs that role in again), a suspension ends the target's.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use waveline_tests::stack::{Mode, Stack, User, json, login, register_and_login, upload, wait_ready};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Anonymous,
    Other,
    Owner,
    Admin,
}

/// Expected statuses for [anonymous, other, owner, admin].
type Cells = [u16; 4];

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The same whatever the track's visibility (routes without a track): run once.
    Any(Cells),
    /// On the public track, then on the private one.
    Track { public: Cells, private: Cells },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Anonymous, other, admin, owner: the owner's call may destroy what the others probe.
    OwnerLast,
    /// Anonymous, other, owner, admin: the admin's call changes the owner's account.
    AdminLast,
}

struct Row {
    method: &'static str,
    path: &'static str,
    expect: Expect,
    order: Order,
}

const fn row(method: &'static str, path: &'static str, expect: Expect) -> Row {
    Row { method, path, expect, order: Order::OwnerLast }
}

const ALL_OK: Cells = [200, 200, 200, 200];
const SIGNED_IN: Cells = [401, 200, 200, 200];
/// Readable by everyone when public…
const READ_PUBLIC: Cells = [200, 200, 200, 200];
/// …and by the owner and admins only when private (404 to the rest, as if it did not exist).
const READ_PRIVATE: Cells = [404, 404, 200, 200];
const fn owner_only(status: u16) -> Expect {
    Expect::Track { public: [401, 403, status, 403], private: [401, 404, status, 403] }
}
const fn owner_or_admin(status: u16) -> Expect {
    Expect::Track { public: [401, 403, status, status], private: [401, 404, status, status] }
}
const READ: Expect = Expect::Track { public: READ_PUBLIC, private: READ_PRIVATE };
/// Likes and reposts (and taking them back): whoever may see it.
const MARK: Expect = Expect::Track { public: [401, 204, 204, 204], private: [401, 404, 204, 204] };
/// A repost: whoever may see it, but not its owner.
const REPOST: Expect = Expect::Track { public: [401, 204, 400, 204], private: [401, 404, 400, 204] };

/// The matrix. Order matters (see the module doc).
const MATRIX: &[Row] = &[
    row("get", "/healthz", Expect::Any(ALL_OK)),
    row("get", "/readyz", Expect::Any(ALL_OK)),
    row("get", "/metrics", Expect::Any(ALL_OK)),
    row("post", "/v1/auth/register", Expect::Any([202, 202, 202, 202])),
    row("post", "/v1/auth/login", Expect::Any(ALL_OK)),
    row("post", "/v1/auth/refresh", Expect::Any(ALL_OK)),
    // Account mail. Verifying an email takes the account's session and the mailed token (a
    // made-up one is refused); resetting a password takes the token alone. Asking for a reset
    // link answers the same to everyone; a new verification link is for the signed-in
    // (unverified) account.
    row("post", "/v1/auth/email/verify", Expect::Any([401, 404, 404, 404])),
    row("post", "/v1/auth/email/resend", Expect::Any([401, 202, 202, 202])),
    row("post", "/v1/auth/password/forgot", Expect::Any([202, 202, 202, 202])),
    row("post", "/v1/auth/password/reset", Expect::Any([404, 404, 404, 404])),
    // OAuth: anyone may start a login (303 to the provider); a callback with no state of
    // this browser's is refused, whoever calls it.
    row("get", "/v1/auth/oauth/{provider}/start", Expect::Any([303, 303, 303, 303])),
    row("get", "/v1/auth/oauth/{provider}/callback", Expect::Any([400, 400, 400, 400])),
    row("get", "/v1/me", Expect::Any(SIGNED_IN)),
    row("get", "/v1/tracks", Expect::Any(ALL_OK)),
    row("post", "/v1/tracks", Expect::Any([401, 202, 202, 202])),
    row("get", "/v1/tracks/{id}", READ),
    row("get", "/v1/tracks/{id}/status", READ),
    row("get", "/v1/tracks/{id}/events", READ),
    row("get", "/v1/tracks/{id}/signed-urls", READ),
    row("get", "/v1/tracks/{id}/stream/{preset}", READ),
    row("head", "/v1/tracks/{id}/stream/{preset}", READ),
    row("get", "/v1/tracks/{id}/hls/master.m3u8", READ),
    row("head", "/v1/tracks/{id}/hls/master.m3u8", READ),
    row("get", "/v1/tracks/{id}/hls/{variant}/{file}", READ),
    row("head", "/v1/tracks/{id}/hls/{variant}/{file}", READ),
    row("get", "/v1/tracks/{id}/waveform", READ),
    row("head", "/v1/tracks/{id}/waveform", READ),
    // A track's statistics are its owner's (and admins'); to others the track is not there.
    row("get", "/v1/tracks/{id}/stats", Expect::Track { public: [401, 404, 200, 200], private: [401, 404, 200, 200] }),
    row("get", "/v1/charts/trending", Expect::Any(ALL_OK)),
    row("get", "/v1/charts/top", Expect::Any(ALL_OK)),
    // An image's sizes are public: the random version in the URL is the secret (before any
    // row that replaces the owner's avatar, whose URL these use).
    row("get", "/v1/images/{subjects}/{id}/{version}/{file}", Expect::Any(ALL_OK)),
    row("head", "/v1/images/{subjects}/{id}/{version}/{file}", Expect::Any(ALL_OK)),
    // A signed URL is its own key: anyone holding it plays, public or private.
    row("get", "/v1/signed/{expires}/{signature}/tracks/{id}/stream/{preset}", Expect::Any(ALL_OK)),
    row("head", "/v1/signed/{expires}/{signature}/tracks/{id}/stream/{preset}", Expect::Any(ALL_OK)),
    row("get", "/v1/signed/{expires}/{signature}/tracks/{id}/hls/master.m3u8", Expect::Any(ALL_OK)),
    row("head", "/v1/signed/{expires}/{signature}/tracks/{id}/hls/master.m3u8", Expect::Any(ALL_OK)),
    row("get", "/v1/signed/{expires}/{signature}/tracks/{id}/hls/{variant}/{file}", Expect::Any(ALL_OK)),
    row("head", "/v1/signed/{expires}/{signature}/tracks/{id}/hls/{variant}/{file}", Expect::Any(ALL_OK)),
    row("get", "/v1/signed/{expires}/{signature}/tracks/{id}/waveform", Expect::Any(ALL_OK)),
    row("head", "/v1/signed/{expires}/{signature}/tracks/{id}/waveform", Expect::Any(ALL_OK)),
    row("put", "/v1/tracks/{id}/share", owner_only(201)),
    row("delete", "/v1/tracks/{id}/share", owner_only(204)),
    row("patch", "/v1/tracks/{id}", owner_only(200)),
    row("put", "/v1/tracks/{id}/artwork", owner_only(202)),
    row("post", "/v1/tracks/{id}/reprocess", owner_or_admin(202)),
    row("post", "/v1/uploads", Expect::Any([401, 201, 201, 201])),
    // A direct upload is its uploader's alone, admins included.
    row("put", "/v1/uploads/{id}", Expect::Track { public: [401, 404, 200, 404], private: [401, 404, 200, 404] }),
    row(
        "post",
        "/v1/uploads/{id}/complete",
        Expect::Track { public: [401, 404, 202, 404], private: [401, 404, 202, 404] },
    ),
    // The social layer. `{username}` is the owner's; following or blocking oneself is 400.
    row("get", "/v1/users/{username}", Expect::Any(ALL_OK)),
    row("patch", "/v1/me", Expect::Any(SIGNED_IN)),
    row("put", "/v1/me/avatar", Expect::Any([401, 202, 202, 202])),
    row("put", "/v1/me/followings/{username}", Expect::Any([401, 204, 400, 204])),
    row("delete", "/v1/me/followings/{username}", Expect::Any([401, 204, 400, 204])),
    row("get", "/v1/users/{username}/followers", Expect::Any(ALL_OK)),
    row("get", "/v1/users/{username}/followings", Expect::Any(ALL_OK)),
    row("put", "/v1/me/blocks/{username}", Expect::Any([401, 204, 400, 204])),
    row("delete", "/v1/me/blocks/{username}", Expect::Any([401, 204, 400, 204])),
    row("get", "/v1/me/blocks", Expect::Any(SIGNED_IN)),
    row("get", "/v1/users/{username}/likes", Expect::Any(ALL_OK)),
    row("get", "/v1/users/{username}/reposts", Expect::Any(ALL_OK)),
    row("get", "/v1/users/{username}/playlists", Expect::Any(ALL_OK)),
    row("get", "/v1/users/{username}/activities", Expect::Any(ALL_OK)),
    row("get", "/v1/me/feed", Expect::Any(SIGNED_IN)),
    // Search: anyone; each sees what they may (tests/tests/search.rs checks which).
    row("get", "/v1/search", Expect::Any(ALL_OK)),
    // Push devices: one's own; a token of another account's moves on `PUT`, and is left alone
    // (204 all the same) on `DELETE`.
    row("put", "/v1/me/devices/{token}", Expect::Any([401, 204, 204, 204])),
    row("delete", "/v1/me/devices/{token}", Expect::Any([401, 204, 204, 204])),
    // Billing, against a fake Stripe: a checkout for the signed-in account (which makes its
    // Stripe customer), then its portal. The webhook is Stripe's: a delivery without a
    // signature is refused whoever sends it.
    row("post", "/v1/billing/checkout", Expect::Any([401, 200, 200, 200])),
    row("post", "/v1/billing/portal", Expect::Any([401, 200, 200, 200])),
    row("post", "/v1/billing/webhook", Expect::Any([400, 400, 400, 400])),
    // Deleting an account takes its password; a wrong one is refused for everyone.
    row("delete", "/v1/me", Expect::Any([401, 403, 403, 403])),
    // Likes and reposts of what one may see; nobody reposts their own.
    row("put", "/v1/me/likes/tracks/{id}", MARK),
    row("delete", "/v1/me/likes/tracks/{id}", MARK),
    row("put", "/v1/me/reposts/tracks/{id}", REPOST),
    row("delete", "/v1/me/reposts/tracks/{id}", MARK),
    // Comments on what one may see; a comment (a new one of the owner's for every cell) is
    // deleted by its author, the track's owner or an admin.
    row(
        "post",
        "/v1/tracks/{id}/comments",
        Expect::Track { public: [401, 201, 201, 201], private: [401, 404, 201, 201] },
    ),
    row("get", "/v1/tracks/{id}/comments", READ),
    row("delete", "/v1/comments/{id}", owner_or_admin(204)),
    // Playlists (one of the owner's of each visibility, holding the track).
    row("post", "/v1/playlists", Expect::Any([401, 201, 201, 201])),
    row("get", "/v1/playlists/{id}", READ),
    row("patch", "/v1/playlists/{id}", owner_only(200)),
    row("put", "/v1/playlists/{id}/tracks", owner_only(200)),
    row("put", "/v1/playlists/{id}/artwork", owner_only(202)),
    row("put", "/v1/me/likes/playlists/{id}", MARK),
    row("delete", "/v1/me/likes/playlists/{id}", MARK),
    row("put", "/v1/me/reposts/playlists/{id}", REPOST),
    row("delete", "/v1/me/reposts/playlists/{id}", MARK),
    row("delete", "/v1/playlists/{id}", owner_only(204)),
    // Direct messages between `other` and the owner; the admin is in no conversation.
    // `{conversation}` is the conversation's id here (a username works too).
    row("post", "/v1/me/conversations/{conversation}/messages", Expect::Any([401, 201, 201, 404])),
    row("get", "/v1/me/conversations", Expect::Any(SIGNED_IN)),
    row("get", "/v1/me/conversations/{conversation}/messages", Expect::Any([401, 200, 200, 404])),
    row("put", "/v1/me/conversations/{id}/read", Expect::Any([401, 204, 204, 404])),
    row("get", "/v1/me/notifications", Expect::Any(SIGNED_IN)),
    row("put", "/v1/me/notifications/read", Expect::Any([401, 204, 204, 204])),
    // The socket: a plain GET is no upgrade (400 once signed in).
    row("post", "/v1/ws/tickets", Expect::Any([401, 201, 201, 201])),
    row("get", "/v1/ws", Expect::Any([401, 400, 400, 400])),
    row("get", "/v1/admin/dead-letters", Expect::Any([401, 403, 403, 200])),
    row("delete", "/v1/tracks/{id}", owner_only(204)),
    Row {
        method: "put",
        path: "/v1/admin/users/{id}/suspension",
        expect: Expect::Any([401, 403, 403, 200]),
        order: Order::AdminLast,
    },
    row("delete", "/v1/admin/users/{id}/suspension", Expect::Any([401, 403, 403, 200])),
    row("post", "/v1/auth/logout", Expect::Any([401, 204, 204, 204])),
];

/// What the cells need: accounts, tracks, and the names to put in the paths.
struct Fixture {
    other: User,
    owner: User,
    admin: User,
    /// The account the admin's user routes act on, and its session.
    target: User,
    /// The account whose credentials the login and refresh rows use.
    spare: User,
    public: TrackFixture,
    private: TrackFixture,
    wav: Vec<u8>,
    registrations: u32,
    /// The conversation of `other` and the owner, and its first message.
    conversation: (String, String),
    /// Client ids of messages sent by the matrix.
    messages: u32,
    /// A small JPEG for the image uploads.
    jpeg: Vec<u8>,
    /// The `large.jpg` URL of the owner's avatar.
    image: String,
}

struct TrackFixture {
    id: String,
    /// `{variant}/{file}` of an HLS variant playlist.
    hls_file: String,
    /// From the owner's `signed-urls`.
    signed: Value,
    /// A direct upload of the owner's with this visibility, awaiting its bytes.
    upload: String,
    /// A playlist of the owner's with this visibility, holding the track.
    playlist: String,
}

/// Redirects are answers here, not something to follow.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

async fn track_fixture(stack: &Stack, owner: &User, visibility: &str, wav: &[u8]) -> Result<TrackFixture> {
    let (status, track) =
        upload(stack, owner, &[("title", visibility), ("visibility", visibility)], ("t.wav", wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    let master = client()
        .get(stack.url(&format!("/v1/tracks/{id}/hls/master.m3u8")))
        .bearer_auth(&owner.token)
        .send()
        .await?
        .text()
        .await?;
    let hls_file =
        master.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).context("a variant")?.to_owned();
    let (_, signed) =
        json(client().get(stack.url(&format!("/v1/tracks/{id}/signed-urls"))).bearer_auth(&owner.token).send().await?)
            .await?;
    let (status, ticket) = json(
        client()
            .post(stack.url("/v1/uploads"))
            .bearer_auth(&owner.token)
            .json(&json!({"filename": "direct.wav", "visibility": visibility}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201, "{status} {ticket}");
    let upload = ticket["upload_id"].as_str().context("upload_id")?.to_owned();
    let (status, playlist) = json(
        client()
            .post(stack.url("/v1/playlists"))
            .bearer_auth(&owner.token)
            .json(&json!({"title": visibility, "visibility": visibility, "track_ids": [id]}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201, "{status} {playlist}");
    let playlist = playlist["id"].as_str().context("playlist id")?.to_owned();
    Ok(TrackFixture { id, hls_file, signed, upload, playlist })
}

impl Fixture {
    fn user(&self, role: Role, path: &str) -> Option<&User> {
        match role {
            Role::Anonymous => None,
            Role::Other => Some(&self.other),
            Role::Owner if path.starts_with("/v1/admin/users/") => Some(&self.target),
            Role::Owner => Some(&self.owner),
            Role::Admin => Some(&self.admin),
        }
    }

    fn user_mut(&mut self, role: Role, path: &str) -> Option<&mut User> {
        match role {
            Role::Anonymous => None,
            Role::Other => Some(&mut self.other),
            Role::Owner if path.starts_with("/v1/admin/users/") => Some(&mut self.target),
            Role::Owner => Some(&mut self.owner),
            Role::Admin => Some(&mut self.admin),
        }
    }

    /// The concrete URL of `path` for a cell.
    fn url(&self, stack: &Stack, path: &str, track: &TrackFixture, comment: &str) -> Result<String> {
        if let Some(rest) = path.strip_prefix("/v1/signed/{expires}/{signature}/tracks/{id}/") {
            let signed = &track.signed;
            let url = match rest {
                "stream/{preset}" => signed["stream_urls"]["mp3_128"].as_str(),
                "hls/master.m3u8" => signed["hls_master_url"].as_str(),
                "hls/{variant}/{file}" => {
                    let master = signed["hls_master_url"].as_str().context("hls")?;
                    return Ok(stack.url(&master.replace("master.m3u8", &track.hls_file)));
                }
                "waveform" => signed["waveform_url"].as_str(),
                other => bail!("no signed URL for {other}"),
            };
            return Ok(stack.url(url.context("signed URL")?));
        }
        if path.starts_with("/v1/images/") {
            return Ok(stack.url(&self.image));
        }
        let id = if path.starts_with("/v1/uploads/") {
            track.upload.as_str()
        } else if path.starts_with("/v1/playlists/") || path.contains("/playlists/{id}") {
            track.playlist.as_str()
        } else if path.starts_with("/v1/comments/") {
            comment
        } else if path.starts_with("/v1/me/conversations/{id}")
            || path.starts_with("/v1/me/conversations/{conversation}")
        {
            self.conversation.0.as_str()
        } else if path.starts_with("/v1/admin/users/") {
            self.target.id.as_str()
        } else {
            track.id.as_str()
        };
        let path = path
            .replace("{id}", id)
            .replace("{conversation}", id)
            .replace("{preset}", "mp3_128")
            .replace("{variant}/{file}", &track.hls_file)
            .replace("{provider}", "corp")
            .replace("{username}", &self.owner.username)
            .replace("{token}", "matrix-device:token_1");
        ensure!(!path.contains('{'), "a parameter the matrix does not fill: {path}");
        Ok(stack.url(&path))
    }
}

/// Runs one cell; returns the status.
async fn call(stack: &Stack, fixture: &mut Fixture, row: &Row, role: Role, track: usize) -> Result<u16> {
    let tracks = [&fixture.public, &fixture.private];
    // Every cell deleting a comment gets a new one, the owner's.
    let comment = if row.path == "/v1/comments/{id}" {
        let (status, comment) = json(
            client()
                .post(stack.url(&format!("/v1/tracks/{}/comments", tracks[track].id)))
                .bearer_auth(&fixture.owner.token)
                .json(&json!({"body": "to delete", "timestamp_ms": 0}))
                .send()
                .await?,
        )
        .await?;
        ensure!(status == 201, "{status} {comment}");
        comment["id"].as_str().context("comment id")?.to_owned()
    } else {
        String::new()
    };
    let url = fixture.url(stack, row.path, tracks[track], &comment)?;
    let method = reqwest::Method::from_bytes(row.method.to_uppercase().as_bytes())?;
    let mut request = client().request(method, &url);
    if let Some(user) = fixture.user(role, row.path) {
        request = request.bearer_auth(&user.token);
    }
    request = match (row.method, row.path) {
        ("post", "/v1/auth/register") => {
            fixture.registrations += 1;
            let name = format!("newcomer{}", fixture.registrations);
            request.json(
                &json!({"email": format!("{name}@example.com"), "username": name, "password": "long-enough-password"}),
            )
        }
        ("post", "/v1/auth/email/verify") => request.json(&json!({"token": "made-up-token"})),
        ("post", "/v1/auth/password/forgot") => request.json(&json!({"email": fixture.spare.email})),
        ("post", "/v1/auth/password/reset") => {
            request.json(&json!({"token": "made-up-token", "password": "long-enough-password"}))
        }
        ("post", "/v1/auth/login") => {
            request.json(&json!({"email": fixture.spare.email, "password": fixture.spare.password}))
        }
        ("post", "/v1/auth/refresh") => {
            let session = login(stack, &fixture.spare.email, &fixture.spare.password, &[]).await?;
            request.json(&json!({"refresh_token": session.refresh}))
        }
        ("post", "/v1/tracks") => {
            let (content_type, body) =
                waveline_tests::stack::multipart(&[("title", "matrix")], Some(("m.wav", &fixture.wav)));
            request.header("content-type", content_type).body(body)
        }
        ("patch", "/v1/me") => request.json(&json!({"bio": "Matrix"})),
        ("put", "/v1/me/devices/{token}") => request.json(&json!({"platform": "android"})),
        ("post", "/v1/billing/webhook") => request.json(&json!({"id": "evt_matrix", "type": "invoice.paid"})),
        ("get", "/v1/search") => request.query(&[("q", "public")]),
        ("patch", _) => request.json(&json!({"title": "Renamed"})),
        ("delete", "/v1/me") => request.json(&json!({"password": "not the password"})),
        ("post", "/v1/tracks/{id}/comments") => request.json(&json!({"body": "matrix", "timestamp_ms": 0})),
        ("post", "/v1/playlists") => request.json(&json!({"title": "matrix"})),
        ("put", "/v1/playlists/{id}/tracks") => request.json(&json!({"track_ids": []})),
        ("post", "/v1/me/conversations/{conversation}/messages") => {
            fixture.messages += 1;
            request.json(&json!({"body": "matrix", "client_id": format!("m-{}", fixture.messages)}))
        }
        ("put", "/v1/me/conversations/{id}/read") => request.json(&json!({"up_to": fixture.conversation.1})),
        ("put", "/v1/me/notifications/read") => request.json(&json!({"up_to": uuid::Uuid::now_v7()})),
        ("post", "/v1/uploads") => request.json(&json!({"filename": "m.wav"})),
        ("put", "/v1/uploads/{id}") => request.header("content-type", "audio/wav").body(fixture.wav.clone()),
        ("put", "/v1/tracks/{id}/artwork" | "/v1/playlists/{id}/artwork" | "/v1/me/avatar") => {
            let (content_type, body) = waveline_tests::stack::multipart(&[], Some(("a.jpg", &fixture.jpeg)));
            request.header("content-type", content_type).body(body)
        }
        _ => request,
    };
    let response = request.send().await?;
    let status = response.status().as_u16();
    drop(response);
    // Keep the world as the next cells expect it.
    match (row.method, row.path, status) {
        ("post", "/v1/tracks/{id}/reprocess", 202) => {
            let id = tracks[track].id.clone();
            let owner = fixture.owner.clone();
            let (_, now) = json(
                client().get(stack.url(&format!("/v1/tracks/{id}/status"))).bearer_auth(&owner.token).send().await?,
            )
            .await?;
            wait_ready(stack, &owner, &id, now["revision"].as_i64().context("revision")?).await?;
        }
        ("post", "/v1/auth/logout", 204) => relogin(stack, fixture, role, row.path).await?,
        ("delete", "/v1/admin/users/{id}/suspension", 200) => relogin(stack, fixture, Role::Owner, row.path).await?,
        _ => {}
    }
    Ok(status)
}

async fn relogin(stack: &Stack, fixture: &mut Fixture, role: Role, path: &str) -> Result<()> {
    if let Some(user) = fixture.user_mut(role, path) {
        let fresh = login(stack, &user.email, &user.password, &[]).await?;
        user.token = fresh.token;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_by_every_role_on_public_and_private_tracks() -> Result<()> {
    let provider = waveline_tests::oauth_provider::FakeProvider::start().await?;
    let stripe = waveline_tests::fake_stripe::FakeStripe::start().await?;
    let mut env = provider.env();
    env.extend(stripe.env("whsec_matrix_secret_0123456789"));
    env.push(("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE".into(), "0".into()));
    env.push(("WAVELINE_SOCIAL_WRITES_PER_MINUTE".into(), "0".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = Stack::start(Mode::Embedded, true, &env).await?;

    // The document and the table list the same operations.
    let (_, spec) = json(client().get(stack.url("/openapi.json")).send().await?).await?;
    let mut documented = BTreeSet::new();
    for (path, operations) in spec["paths"].as_object().context("paths")? {
        for method in operations.as_object().context("operations")?.keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let tabled: BTreeSet<(String, String)> =
        MATRIX.iter().map(|row| (row.method.to_owned(), row.path.to_owned())).collect();
    let missing: Vec<_> = documented.difference(&tabled).collect();
    ensure!(missing.is_empty(), "operations with no row in the authorization matrix: {missing:?}");
    let stale: Vec<_> = tabled.difference(&documented).collect();
    ensure!(stale.is_empty(), "rows for operations the document does not have: {stale:?}");

    let owner = register_and_login(&stack, "owner").await?;
    let other = register_and_login(&stack, "other").await?;
    let admin = register_and_login(&stack, "admin").await?;
    let target = register_and_login(&stack, "target").await?;
    let spare = register_and_login(&stack, "spare").await?;
    stack.promote(&admin).await?;
    let dir = waveline_tests::temp_dir()?;
    let song = dir.path().join("song.wav");
    waveline_tests::audio::tone(&song, 2.0, 22050, 1, &[])?;
    let wav = std::fs::read(&song)?;
    let public = track_fixture(&stack, &owner, "public", &wav).await?;
    let private = track_fixture(&stack, &owner, "private", &wav).await?;
    let (status, first) = json(
        client()
            .post(stack.url(&format!("/v1/me/conversations/{}/messages", owner.username)))
            .bearer_auth(&other.token)
            .json(&json!({"body": "hello", "client_id": "first"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(status == 201, "{status} {first}");
    let conversation = (
        first["conversation_id"].as_str().context("conversation_id")?.to_owned(),
        first["id"].as_str().context("message id")?.to_owned(),
    );
    let jpeg = waveline_tests::images::jpeg(&waveline_tests::images::picture(40, 30, |x, _| [x as u8, 90, 200]))?;
    let (status, accepted) = waveline_tests::images::put_image(&stack, &owner, "/v1/me/avatar", &jpeg).await?;
    ensure!(status == 202, "{status} {accepted}");
    let me = waveline_tests::images::wait_image(&stack, Some(&owner), "/v1/me", "avatar_state").await?;
    let image = me["avatar_url"].as_str().with_context(|| format!("no avatar: {me}"))?.to_owned();
    let mut fixture = Fixture {
        other,
        owner,
        admin,
        target,
        spare,
        public,
        private,
        wav,
        registrations: 0,
        conversation,
        messages: 0,
        jpeg,
        image,
    };

    let mut wrong = Vec::new();
    for row in MATRIX {
        let runs: Vec<(usize, Cells)> = match row.expect {
            Expect::Any(cells) => vec![(0, cells)],
            Expect::Track { public, private } => vec![(0, public), (1, private)],
        };
        for (track, cells) in runs {
            let order = match row.order {
                Order::OwnerLast => [Role::Anonymous, Role::Other, Role::Admin, Role::Owner],
                Order::AdminLast => [Role::Anonymous, Role::Other, Role::Owner, Role::Admin],
            };
            for role in order {
                let expected = cells[role as usize];
                let got = call(&stack, &mut fixture, row, role, track).await?;
                if got != expected {
                    let visibility =
                        if matches!(row.expect, Expect::Any(_)) { "-" } else { ["public", "private"][track] };
                    wrong.push(format!(
                        "{} {} as {role:?} on {visibility}: expected {expected}, got {got}",
                        row.method, row.path
                    ));
                }
            }
        }
    }
    ensure!(wrong.is_empty(), "{} cells differ:\n{}", wrong.len(), wrong.join("\n"));
    Ok(())
}
