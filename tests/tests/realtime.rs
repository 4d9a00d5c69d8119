//! The realtime socket end to end, over real connections to the real `waveline serve`:
//! authentication (tickets, bearer, cookie with its `Origin` checked), every frame type, bad
//! and abusive clients, blocks and rate limits, idempotent sends, direct messages and
//! notifications over REST, and delivery across two replicas through RabbitMQ, including a
//! replica killed with `kill -9`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use waveline_tests::stack::{Mode, Stack, User, register_and_login, upload, wait_ready};
use waveline_tests::{audio, temp_dir};

const UNLIMITED: &[(&str, &str)] = &[
    ("WAVELINE_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_AUTH_RATE_LIMIT_PER_MINUTE", "0"),
    ("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "0"),
    ("WAVELINE_CORS_ORIGINS", "https://app.example"),
];

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A client socket.
struct Socket {
    ws: Ws,
}

/// Opens `/v1/ws` on `base` (an `http://` URL) with a query and headers; the HTTP status when
/// the upgrade is refused.
async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> Result<std::result::Result<Socket, u16>> {
    let url = format!("{}/v1/ws{query}", base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())?;
        request.headers_mut().insert(name, value.parse()?);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Ok(Socket { ws })),
        Err(WsError::Http(response)) => Ok(Err(response.status().as_u16())),
        Err(err) => Err(err.into()),
    }
}

/// Opens a socket for `user` with a bearer token.
async fn connect(base: &str, user: &User) -> Result<Socket> {
    let bearer = format!("Bearer {}", user.token);
    open(base, "", &[("authorization", &bearer)]).await?.map_err(|status| anyhow::anyhow!("refused: {status}"))
}

impl Socket {
    async fn send(&mut self, frame: Value) -> Result<()> {
        self.ws.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    /// The next frame of `kind` within `within`, skipping others.
    async fn next(&mut self, kind: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .with_context(|| format!("no {kind} frame within {within:?}"))?
                .context("the socket ended")??;
            if let Message::Text(text) = frame {
                let value: Value = serde_json::from_str(&text)?;
                if value["type"] == kind {
                    return Ok(value);
                }
            }
        }
    }

    /// The next notification of `kind` within `within`, skipping other frames (a track's
    /// processing may still be telling its owner it is ready).
    async fn notification(&mut self, kind: &str, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let frame = self.next("notification", deadline.saturating_duration_since(Instant::now())).await?;
            if frame["notification"]["type"] == kind {
                return Ok(frame);
            }
        }
    }

    /// Waits for the server to close the socket; its close code.
    async fn closed(&mut self, within: Duration) -> Result<Option<CloseCode>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await.context("the socket stayed open")? {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }
}

async fn call(base: &str, method: &str, path: &str, user: Option<&User>, body: Option<Value>) -> Result<(u16, Value)> {
    let mut request =
        reqwest::Client::new().request(reqwest::Method::from_bytes(method.as_bytes())?, format!("{base}{path}"));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
}

async fn ready_track(stack: &Stack, owner: &User, visibility: &str) -> Result<String> {
    let dir = temp_dir()?;
    let path = dir.path().join("t.wav");
    audio::tone(&path, 2.0, 22050, 1, &[])?;
    let wav = std::fs::read(&path)?;
    let (status, track) =
        upload(stack, owner, &[("title", "live"), ("visibility", visibility)], ("t.wav", &wav)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();
    wait_ready(stack, owner, &id, 1).await?;
    Ok(id)
}

const SOON: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_authenticates_and_refuses_cross_site_cookies() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    ensure!(open(&stack.base, "", &[]).await?.err() == Some(401), "anonymous");

    // A ticket works once.
    let (status, ticket) = call(&stack.base, "POST", "/v1/ws/tickets", Some(&alice), None).await?;
    ensure!(status == 201 && ticket["expires_in"] == 30, "{status} {ticket}");
    let query = format!("?ticket={}", ticket["ticket"].as_str().context("ticket")?);
    let mut socket = open(&stack.base, &query, &[]).await?.map_err(|s| anyhow::anyhow!("ticket refused: {s}"))?;
    socket.send(json!({"type": "ping"})).await?;
    socket.next("pong", SOON).await?;
    ensure!(open(&stack.base, &query, &[]).await?.err() == Some(401), "a used ticket");
    ensure!(open(&stack.base, "?ticket=made-up", &[]).await?.err() == Some(401), "a made-up ticket");

    // The cookie, from an allowed origin or a non-browser client; never from another site.
    let cookie = alice.cookie.as_str();
    ensure!(open(&stack.base, "", &[("cookie", cookie), ("origin", "https://evil.example")]).await?.err() == Some(403));
    ensure!(open(&stack.base, "", &[("cookie", cookie), ("origin", "https://app.example")]).await?.is_ok());
    ensure!(open(&stack.base, "", &[("cookie", cookie)]).await?.is_ok());
    // A bearer token in the header; logging out closes the session's sockets.
    let mut socket = connect(&stack.base, &alice).await?;
    let (status, _) = call(&stack.base, "POST", "/v1/auth/logout", Some(&alice), None).await?;
    ensure!(status == 204, "{status}");
    ensure!(socket.closed(SOON).await? == Some(CloseCode::Policy), "a socket of an ended session closes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_type_flows_and_bad_frames_answer_errors() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, true, UNLIMITED).await?;
    let base = stack.base.clone();
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let carol = register_and_login(&stack, "carol").await?;
    let track = ready_track(&stack, &alice, "public").await?;
    let hidden = ready_track(&stack, &alice, "private").await?;
    let mut a = connect(&base, &alice).await?;
    let mut b = connect(&base, &bob).await?;
    let mut b2 = connect(&base, &bob).await?;

    // Live counters and comments of a watched track.
    b.send(json!({"type": "subscribe", "track_id": track})).await?;
    b.send(json!({"type": "ping"})).await?;
    b.next("pong", SOON).await?; // the subscription is in place
    call(&base, "PUT", &format!("/v1/me/likes/tracks/{track}"), Some(&carol), None).await?;
    let counters = b.next("counters", SOON).await?;
    ensure!(counters["track_id"] == track.as_str() && counters["likes_count"] == 1, "{counters}");
    let comment = json!({"body": "so good", "timestamp_ms": 1000});
    call(&base, "POST", &format!("/v1/tracks/{track}/comments"), Some(&carol), Some(comment)).await?;
    let new = b.next("comment.new", SOON).await?;
    ensure!(new["comment"]["body"] == "so good" && new["comment"]["user"]["username"] == "carol", "{new}");
    let counters = b.next("counters", SOON).await?;
    ensure!(counters["comment_count"] == 1 && counters["likes_count"] == 1, "{counters}");
    // A play (Carol starts the stream) reaches the watchers once it is written.
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/tracks/{track}/stream/mp3_128"))
        .bearer_auth(&carol.token)
        .header("range", "bytes=0-1")
        .send()
        .await?;
    ensure!(response.status() == 206, "{}", response.status());
    let counters = b.next("counters", SOON).await?;
    ensure!(counters["playback_count"] == 1 && counters["comment_count"] == 1, "{counters}");
    // Alice hears of the like and the comment.
    let liked = a.notification("like", SOON).await?;
    ensure!(liked["notification"]["actor"]["username"] == "carol", "{liked}");
    let commented = a.notification("comment", SOON).await?;
    ensure!(commented["notification"]["track_id"] == track.as_str(), "{commented}");

    // A message reaches the recipient and the sender's other device, and the recipient's
    // notification; a retried send does not duplicate.
    b.send(json!({"type": "message.send", "to": "alice", "body": "hey alice", "client_id": "b-1"})).await?;
    let got = a.next("message.new", SOON).await?;
    ensure!(got["message"]["body"] == "hey alice" && got["message"]["client_id"] == "b-1", "{got}");
    let echoed = b2.next("message.new", SOON).await?;
    ensure!(echoed["message"]["id"] == got["message"]["id"], "{echoed}");
    let note = a.notification("message", SOON).await?;
    ensure!(note["notification"]["actor"]["username"] == "bob", "{note}");
    b.send(json!({"type": "message.send", "to": "alice", "body": "hey alice", "client_id": "b-1"})).await?;
    let conversation = got["message"]["conversation_id"].as_str().context("conversation")?.to_owned();
    let (_, messages) =
        call(&base, "GET", &format!("/v1/me/conversations/{conversation}/messages"), Some(&alice), None).await?;
    ensure!(messages["messages"].as_array().map(Vec::len) == Some(1), "{messages}");
    // Reading reaches both sides.
    a.send(json!({"type": "message.read", "conversation_id": conversation, "up_to": got["message"]["id"]})).await?;
    let read = b.next("message.read", SOON).await?;
    ensure!(read["user_id"] == alice.id.as_str() && read["up_to"] == got["message"]["id"], "{read}");
    a.next("message.read", SOON).await?;

    // A follow is a notification; one's own track's processing arrives as track.status.
    call(&base, "PUT", "/v1/me/followings/alice", Some(&carol), None).await?;
    let followed = a.notification("follow", SOON).await?;
    ensure!(followed["notification"]["actor"]["username"] == "carol", "{followed}");
    let dir = temp_dir()?;
    let path = dir.path().join("n.wav");
    audio::tone(&path, 2.0, 22050, 1, &[])?;
    upload(&stack, &alice, &[("title", "new")], ("n.wav", &std::fs::read(&path)?)).await?;
    loop {
        let status = a.next("track.status", Duration::from_secs(60)).await?;
        if status["status"]["state"] == "ready" {
            break;
        }
    }
    a.notification("track_ready", SOON).await?;

    // Refusals answer `error` with a code and the frame's reference.
    b.send(json!({"type": "subscribe", "track_id": hidden})).await?;
    let refused = b.next("error", SOON).await?;
    ensure!(refused["code"] == "not_found" && refused["ref"] == hidden.as_str(), "{refused}");
    b.ws.send(Message::text("{not json")).await?;
    ensure!(b.next("error", SOON).await?["code"] == "invalid_frame");
    b.send(json!({"type": "dance"})).await?;
    ensure!(b.next("error", SOON).await?["code"] == "unknown_type");
    b.send(json!({"type": "message.send", "to": "alice"})).await?;
    ensure!(b.next("error", SOON).await?["code"] == "invalid_frame");
    b.send(json!({"type": "message.send", "to": "alice", "body": "x".repeat(20_000), "client_id": "big"})).await?;
    ensure!(b.next("error", SOON).await?["code"] == "frame_too_large");
    call(&base, "PUT", "/v1/me/blocks/bob", Some(&alice), None).await?;
    b.send(json!({"type": "message.send", "to": "alice", "body": "still?", "client_id": "b-2"})).await?;
    let blocked = b.next("error", SOON).await?;
    ensure!(blocked["code"] == "blocked" && blocked["ref"] == "b-2", "{blocked}");

    // Repeated abuse closes the socket with the policy code.
    for _ in 0..12 {
        if b.ws.send(Message::text("nope")).await.is_err() {
            break;
        }
    }
    ensure!(b.closed(SOON).await? == Some(CloseCode::Policy), "abuse closes with 1008");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_over_rest_with_unread_counts_and_who_may_write() -> Result<()> {
    let mut env = UNLIMITED.to_vec();
    env.retain(|(name, _)| *name != "WAVELINE_SOCIAL_WRITES_PER_MINUTE");
    env.push(("WAVELINE_SOCIAL_WRITES_PER_MINUTE", "6"));
    let stack = Stack::start(Mode::Embedded, false, &env).await?;
    let base = stack.base.clone();
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let send = |user: &User, to: &str, body: &str, id: &str| {
        let (user, to, body, id) = (user.clone(), to.to_owned(), body.to_owned(), id.to_owned());
        let base = base.clone();
        async move {
            call(
                &base,
                "POST",
                &format!("/v1/me/conversations/{to}/messages"),
                Some(&user),
                Some(json!({"body": body, "client_id": id})),
            )
            .await
        }
    };
    let (status, first) = send(&bob, "alice", "one", "1").await?;
    ensure!(status == 201, "{status} {first}");
    let (status, again) = send(&bob, "alice", "one", "1").await?;
    ensure!(status == 200 && again["id"] == first["id"], "a retried send: {status} {again}");
    let (status, second) = send(&bob, "alice", "two", "2").await?;
    ensure!(status == 201, "{status}");
    let (_, list) = call(&base, "GET", "/v1/me/conversations", Some(&alice), None).await?;
    let conversation = &list["conversations"][0];
    ensure!(conversation["user"]["username"] == "bob" && conversation["unread_count"] == 2, "{list}");
    ensure!(conversation["last_message"]["body"] == "two", "{list}");
    let id = conversation["id"].as_str().context("id")?;
    let (status, _) = call(
        &base,
        "PUT",
        &format!("/v1/me/conversations/{id}/read"),
        Some(&alice),
        Some(json!({"up_to": first["id"]})),
    )
    .await?;
    ensure!(status == 204, "{status}");
    let (_, list) = call(&base, "GET", "/v1/me/conversations", Some(&alice), None).await?;
    ensure!(list["conversations"][0]["unread_count"] == 1, "{list}");
    let (_, page) =
        call(&base, "GET", &format!("/v1/me/conversations/{id}/messages?limit=1"), Some(&alice), None).await?;
    ensure!(page["messages"][0]["id"] == second["id"] && page["next_cursor"].is_string(), "{page}");
    let (_, notes) = call(&base, "GET", "/v1/me/notifications", Some(&alice), None).await?;
    ensure!(notes["unread_count"] == 2 && notes["notifications"][0]["type"] == "message", "{notes}");
    let newest = notes["notifications"][0]["id"].clone();
    call(&base, "PUT", "/v1/me/notifications/read", Some(&alice), Some(json!({"up_to": newest}))).await?;
    let (_, notes) = call(&base, "GET", "/v1/me/notifications", Some(&alice), None).await?;
    ensure!(notes["unread_count"] == 0, "{notes}");

    // A conversation is named by its id or by the other account's username.
    let (_, by_name) = call(&base, "GET", "/v1/me/conversations/bob/messages?limit=1", Some(&alice), None).await?;
    ensure!(by_name["messages"][0]["id"] == second["id"], "{by_name}");
    // Sending and reading are one resource to a client:
    // a method it does not have lists both.
    let response = reqwest::Client::new()
        .put(format!("{base}/v1/me/conversations/{id}/messages"))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    let allow = response.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    ensure!(response.status() == 405 && allow.contains("GET") && allow.contains("POST"), "{allow}");

    // Only the accounts alice follows, now.
    call(&base, "PATCH", "/v1/me", Some(&alice), Some(json!({"messages_from": "following"}))).await?;
    let (status, refused) = send(&bob, "alice", "three", "3").await?;
    ensure!(status == 403 && refused["code"] == "messages_restricted", "{status} {refused}");
    // Nobody else reads the conversation; oneself and strangers are refused.
    let (status, _) = call(&base, "GET", &format!("/v1/me/conversations/{id}/messages"), None, None).await?;
    ensure!(status == 401);
    let (status, body) = send(&alice, "alice", "me", "4").await?;
    ensure!(status == 400 && body["code"] == "cannot_message_self", "{status} {body}");
    let (status, body) = send(&alice, "nobody", "hi", "5").await?;
    ensure!(status == 404, "{status} {body}");
    let (status, body) = send(&alice, "bob", "x".repeat(2001).as_str(), "6").await?;
    ensure!(status == 400 && body["message"].as_str().is_some_and(|m| m.contains("body")), "{status} {body}");
    // Sends count against the account's write rate.
    let mut statuses = Vec::new();
    for n in 0..6 {
        statuses.push(send(&alice, "bob", "hi", &format!("r{n}")).await?.0);
    }
    ensure!(statuses.contains(&429), "{statuses:?}");

    // Deleting an account deletes its messages, on both sides.
    let (status, _) = call(&base, "DELETE", "/v1/me", Some(&bob), Some(json!({"password": bob.password}))).await?;
    ensure!(status == 204, "{status}");
    let (_, list) = call(&base, "GET", "/v1/me/conversations", Some(&alice), None).await?;
    ensure!(list["conversations"].as_array().is_some_and(Vec::is_empty), "{list}");
    let (_, notes) = call(&base, "GET", "/v1/me/notifications", Some(&alice), None).await?;
    ensure!(notes["notifications"].as_array().is_some_and(Vec::is_empty), "{notes}");
    Ok(())
}

/// A peer that stops answering (no frames, no pongs) is dropped within 75 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_within_75_seconds() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let mut socket = connect(&stack.base, &alice).await?;
    let opened = Instant::now();
    // The client reads nothing, so it answers no ping: the server's count of dead peers is the
    // event to wait for.
    let dropped = loop {
        let metrics = reqwest::get(stack.url("/metrics")).await?.text().await?;
        if metrics.lines().any(|l| l.starts_with("waveline_ws_dead_peers_total") && l.ends_with(" 1")) {
            break opened.elapsed();
        }
        ensure!(opened.elapsed() < Duration::from_secs(85), "the silent peer was not dropped");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(dropped >= Duration::from_secs(65) && dropped <= Duration::from_secs(76), "dropped after {dropped:?}");
    // And the client finds its socket closed.
    let deadline = Instant::now() + SOON;
    loop {
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), socket.ws.next()).await {
            Err(_) => bail!("the socket is still open"),
            Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => return Ok(()),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Two replicas behind RabbitMQ: a message, a like and a comment each arrive within a second
/// on the other replica; a replica killed with `kill -9` loses no stored message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_within_a_second_and_survive_a_crash() -> Result<()> {
    let stack = Stack::start(Mode::Distributed, true, UNLIMITED).await?;
    let replica = stack.replica().await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    let track = ready_track(&stack, &alice, "public").await?;
    let mut a = connect(&stack.base, &alice).await?;
    let mut b = connect(&replica.base, &bob).await?;
    a.send(json!({"type": "subscribe", "track_id": track})).await?;
    a.send(json!({"type": "ping"})).await?;
    a.next("pong", SOON).await?;
    b.send(json!({"type": "ping"})).await?;
    b.next("pong", SOON).await?;

    let second = Duration::from_secs(1);
    let started = Instant::now();
    b.send(json!({"type": "message.send", "to": "alice", "body": "across", "client_id": "x-1"})).await?;
    let got = a.next("message.new", second).await?;
    ensure!(got["message"]["body"] == "across", "{got}");
    let message_took = started.elapsed();

    let started = Instant::now();
    call(&replica.base, "PUT", &format!("/v1/me/likes/tracks/{track}"), Some(&bob), None).await?;
    let counters = a.next("counters", second).await?;
    ensure!(counters["likes_count"] == 1, "{counters}");
    let like_took = started.elapsed();

    let started = Instant::now();
    let comment = json!({"body": "from the other side", "timestamp_ms": 5});
    call(&replica.base, "POST", &format!("/v1/tracks/{track}/comments"), Some(&bob), Some(comment)).await?;
    let new = a.next("comment.new", second).await?;
    ensure!(new["comment"]["body"] == "from the other side", "{new}");
    let comment_took = started.elapsed();
    eprintln!("across replicas: message {message_took:?}, like {like_took:?}, comment {comment_took:?}");

    // Bob's replica dies; Alice keeps writing; Bob comes back on the other replica and
    // fetches what he missed.
    let status = std::process::Command::new("kill").args(["-9", &replica.pid().to_string()]).status()?;
    ensure!(status.success());
    // The dead replica's socket breaks (no close frame from a killed process).
    b.closed(Duration::from_secs(10)).await?;
    for n in 0..3 {
        a.send(json!({"type": "message.send", "to": "bob", "body": format!("while away {n}"), "client_id": format!("a-{n}")}))
            .await?;
        a.next("message.new", SOON).await?;
    }
    let mut b = connect(&stack.base, &bob).await?;
    let conversation = got["message"]["conversation_id"].as_str().context("conversation")?;
    let (_, page) =
        call(&stack.base, "GET", &format!("/v1/me/conversations/{conversation}/messages"), Some(&bob), None).await?;
    let bodies: Vec<&str> =
        page["messages"].as_array().context("messages")?.iter().filter_map(|m| m["body"].as_str()).collect();
    ensure!(bodies == ["while away 2", "while away 1", "while away 0", "across"], "{bodies:?}");
    a.send(json!({"type": "message.send", "to": "bob", "body": "welcome back", "client_id": "a-9"})).await?;
    ensure!(b.next("message.new", second).await?["message"]["body"] == "welcome back");
    Ok(())
}

/// A client that does not read is cut off once its queue passes the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected() -> Result<()> {
    let stack = Stack::start(Mode::Embedded, false, UNLIMITED).await?;
    let alice = register_and_login(&stack, "alice").await?;
    let bob = register_and_login(&stack, "bob").await?;
    // A tiny receive buffer, and no reading: the server's frames pile up in its queue.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let address = stack.base.trim_start_matches("http://").parse()?;
    let stream = socket.connect(address).await?;
    let mut request = format!("ws://{}/v1/ws", stack.base.trim_start_matches("http://")).into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", alice.token).parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await?;
    let body = "m".repeat(1900);
    let client = reqwest::Client::new();
    let mut cut = false;
    for n in 0..4000 {
        let response = client
            .post(stack.url("/v1/me/conversations/alice/messages"))
            .bearer_auth(&bob.token)
            .json(&json!({"body": body, "client_id": format!("flood-{n}")}))
            .send()
            .await?;
        ensure!(response.status() == 201, "{}", response.status());
        if n % 200 == 199 {
            let metrics = client.get(stack.url("/metrics")).send().await?.text().await?;
            if metrics.lines().any(|l| l.starts_with("waveline_ws_slow_clients_total") && !l.ends_with(" 0")) {
                cut = true;
                break;
            }
        }
    }
    ensure!(cut, "the slow client was never cut off");
    // What it finally reads ends with the policy close.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await.context("no close")? {
            Some(Ok(Message::Close(frame))) => {
                ensure!(frame.map(|f| f.code) == Some(CloseCode::Policy));
                return Ok(());
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => bail!("the socket broke instead of closing: {err}"),
            None => bail!("the socket ended without a close frame"),
        }
    }
}
