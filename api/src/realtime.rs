//! Real time: one websocket per client, `GET /v1/ws`, for direct messages, live counters and
//! comments of the tracks on screen, notifications, and one's own tracks' processing.
//!
//! **Opening.** A client authenticates with its session cookie (a browser: the `Origin` must
//! be one of `cors_origins` or the API's own, so another site cannot open a socket with the
//! visitor's cookie), with `Authorization: Bearer` (native clients), or with a single-use
//! ticket from `POST /v1/ws/tickets` passed as `?ticket=` (valid 30 s, on any replica; only its
//! hash is stored). A long-lived token never goes in a URL.
//!
//! **Frames** are JSON text frames `{"type": …}`; the README's table lists them all.
//! Client → server: `subscribe` / `unsubscribe {track_id}`, `message.send {to, body,
//! client_id}`, `message.read {conversation_id, up_to}`, `ping`. Server → client:
//! `message.new`, `message.read`, `counters`, `comment.new`, `notification`, `track.status`,
//! `pong`, `error {code, message, ref}`.
//!
//! **Health and bounds.**
//! - A ping goes out every 30 s; a peer silent for 70 s (no frame, no pong) is dropped.
//! - Outgoing frames wait in a queue of at most [`MAX_QUEUED_BYTES`] (1 MiB) per socket: a
//!   client that does not read is disconnected (close code 1008) rather than buffered for.
//! - A frame over [`MAX_FRAME_BYTES`] gets an `error` (`frame_too_large`); over 64 KiB the
//!   protocol layer closes the socket (1009). Malformed JSON (`invalid_frame`), an unknown
//!   type (`unknown_type`) or a refused action each answer `error`; more than
//!   [`MAX_ERRORS`] errors in a minute, or more than [`MAX_FRAMES_PER_SECOND`] frames a
//!   second, closes the socket with 1008 (policy).
//! - At most [`MAX_SUBSCRIPTIONS`] tracks per socket and [`MAX_SOCKETS_PER_ACCOUNT`] sockets
//!   per account on one process.
//!
//! **Sessions.** A socket acts for the session it opened with: when that session ends (logout,
//! a reused refresh token, its lifetime) or the account changes (suspended, deleted, its
//! password reset), the socket closes with 1008, as the session cache hears it.
//!
//! **Across replicas.** Every event goes through the bus ([`waveline_shared::bus`]): each
//! process delivers it to the sockets it holds. `track.status` comes from the status feed,
//! which every process already follows. Which accounts have a live socket anywhere is kept in
//! PostgreSQL (`ws_presence`), so a notification for an account with none becomes a push.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use futures::{SinkExt as _, StreamExt as _};
use poem::http::StatusCode;
use poem::web::websocket::{CloseCode, Message as Frame, WebSocket, WebSocketConfig, WebSocketStream};
use poem::{FromRequest, IntoResponse, Request};
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaResponse, MetaResponses, Registry};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use waveline_shared::bus::{Event, EventBus};
use waveline_shared::db::realtime::PgRealtime;
use waveline_shared::documents::{Comment, Notification};
use waveline_shared::domain::{TrackId, UserId};

use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::ApiError;
use crate::inbox::{MessageView, notification_views};
use crate::social::UserSummaryView;
use crate::{AppState, may_see};

/// Outgoing bytes one socket may have waiting.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// The largest frame a client may send that is answered (larger ones get `error`).
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// Errors in a minute before the socket is closed.
pub const MAX_ERRORS: u32 = 10;
/// Frames a second a client may send.
pub const MAX_FRAMES_PER_SECOND: u32 = 20;
/// Tracks one socket may watch.
pub const MAX_SUBSCRIPTIONS: usize = 50;
/// Sockets one account may hold on one process.
pub const MAX_SOCKETS_PER_ACCOUNT: usize = 10;
/// How long a ticket works.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(30);
const SILENT_FOR: Duration = Duration::from_secs(70);
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Frames larger than this close the socket at the protocol level.
const PROTOCOL_MAX_BYTES: usize = 64 * 1024;

#[derive(Tags)]
enum Tag {
    /// The realtime socket.
    Realtime,
}

/// The realtime routes.
#[derive(Debug)]
pub struct RealtimeApi {
    pub state: AppState,
}

/// The realtime side of a process: its bus, its sockets, and its presence.
#[derive(Debug)]
pub struct Realtime {
    pub bus: Arc<dyn EventBus>,
    pub hub: Arc<Hub>,
    /// This process, in `ws_presence`.
    pub replica: Uuid,
    pub store: PgRealtime,
}

impl Realtime {
    pub fn new(bus: Arc<dyn EventBus>, store: PgRealtime) -> Arc<Realtime> {
        Arc::new(Realtime { bus, hub: Arc::new(Hub::default()), replica: Uuid::now_v7(), store })
    }

    /// Starts delivering: bus events and status changes to this process's sockets, and the
    /// presence refresh. Runs until `stop`.
    pub fn start(state: &AppState, stop: CancellationToken) {
        let realtime = state.realtime.clone();
        let events_state = state.clone();
        let events_stop = stop.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            while !events_stop.is_cancelled() {
                match events_state.realtime.bus.subscribe().await {
                    Ok(mut events) => {
                        pause = Duration::from_millis(200);
                        loop {
                            tokio::select! {
                                () = events_stop.cancelled() => return,
                                next = events.next() => match next {
                                    Some(event) => dispatch(&events_state, event).await,
                                    None => break,
                                },
                            }
                        }
                        tracing::warn!("the event bus subscription ended; subscribing again");
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot subscribe to the event bus; retrying"),
                }
                tokio::select! {
                    () = events_stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        });
        let sessions_state = state.clone();
        let sessions_stop = stop.clone();
        tokio::spawn(async move {
            let mut changes = sessions_state.status_feed.sessions().subscribe();
            loop {
                tokio::select! {
                    () = sessions_stop.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(change) => sessions_state.realtime.hub.revoke(change.session, change.user),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let status_state = state.clone();
        let status_stop = stop.clone();
        tokio::spawn(async move {
            let mut changes = status_state.status_feed.subscribe();
            loop {
                tokio::select! {
                    () = status_stop.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(crate::status_feed::Change::Status(announced)) => track_status(&status_state, &announced),
                        Ok(crate::status_feed::Change::Resync) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        realtime.hub.closing.cancel();
                        if let Err(err) = realtime.store.leave(realtime.replica).await {
                            tracing::warn!(error = %err, "could not clear this process's presence");
                        }
                        return;
                    }
                    _ = every.tick() => {
                        if let Err(err) = realtime.store.refresh(realtime.replica).await {
                            tracing::warn!(error = %err, "could not refresh this process's presence");
                        }
                    }
                }
            }
        });
    }
}

/// A socket's outgoing queue, bounded by bytes.
#[derive(Debug, Clone)]
struct Outgoing {
    tx: mpsc::UnboundedSender<Arc<str>>,
    queued: Arc<AtomicUsize>,
    kill: CancellationToken,
}

impl Outgoing {
    fn push(&self, frame: Arc<str>) {
        let size = frame.len();
        if self.queued.fetch_add(size, Ordering::AcqRel) + size > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            if !self.kill.is_cancelled() {
                metrics::counter!("waveline_ws_slow_clients_total").increment(1);
                self.kill.cancel();
            }
            return;
        }
        if self.tx.send(frame).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
        }
    }
}

#[derive(Debug)]
struct Conn {
    user: UserId,
    /// The session it acts for.
    session: Uuid,
    out: Outgoing,
    tracks: HashSet<TrackId>,
    /// Cancelled when the session ends or the account changes: the socket closes.
    revoked: CancellationToken,
}

#[derive(Debug, Default)]
struct Sockets {
    conns: HashMap<u64, Conn>,
    users: HashMap<UserId, HashSet<u64>>,
    tracks: HashMap<TrackId, HashSet<u64>>,
}

/// The sockets of this process, by account and by watched track.
#[derive(Debug, Default)]
pub struct Hub {
    inner: Mutex<Sockets>,
    next: AtomicU64,
    /// Cancelled when the process stops: every socket closes with 1001 (going away).
    closing: CancellationToken,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Sockets> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the sockets of a session that ended, or of an account that changed.
    fn revoke(&self, session: Option<Uuid>, user: Option<Uuid>) {
        let inner = self.lock();
        for conn in inner.conns.values() {
            if session == Some(conn.session) || user == Some(conn.user.0) {
                conn.revoked.cancel();
            }
        }
    }

    /// Adds a socket of `user`, unless it has [`MAX_SOCKETS_PER_ACCOUNT`] here already.
    fn register(&self, user: UserId, session: Uuid, out: Outgoing, revoked: CancellationToken) -> Option<u64> {
        let mut inner = self.lock();
        let mine = inner.users.entry(user).or_default();
        if mine.len() >= MAX_SOCKETS_PER_ACCOUNT {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        mine.insert(id);
        inner.conns.insert(id, Conn { user, session, out, tracks: HashSet::new(), revoked });
        metrics::gauge!("waveline_ws_connections").set(inner.conns.len() as f64);
        Some(id)
    }

    fn unregister(&self, id: u64) {
        let mut inner = self.lock();
        let Some(conn) = inner.conns.remove(&id) else {
            return;
        };
        if let Some(mine) = inner.users.get_mut(&conn.user) {
            mine.remove(&id);
            if mine.is_empty() {
                inner.users.remove(&conn.user);
            }
        }
        for track in conn.tracks {
            if let Some(watching) = inner.tracks.get_mut(&track) {
                watching.remove(&id);
                if watching.is_empty() {
                    inner.tracks.remove(&track);
                }
            }
        }
        metrics::gauge!("waveline_ws_connections").set(inner.conns.len() as f64);
    }

    /// `false` when the socket watches [`MAX_SUBSCRIPTIONS`] tracks already.
    fn subscribe(&self, id: u64, track: TrackId) -> bool {
        let mut inner = self.lock();
        let Some(conn) = inner.conns.get_mut(&id) else {
            return false;
        };
        if !conn.tracks.contains(&track) && conn.tracks.len() >= MAX_SUBSCRIPTIONS {
            return false;
        }
        conn.tracks.insert(track);
        inner.tracks.entry(track).or_default().insert(id);
        true
    }

    fn unsubscribe(&self, id: u64, track: TrackId) {
        let mut inner = self.lock();
        if let Some(conn) = inner.conns.get_mut(&id) {
            conn.tracks.remove(&track);
        }
        if let Some(watching) = inner.tracks.get_mut(&track) {
            watching.remove(&id);
            if watching.is_empty() {
                inner.tracks.remove(&track);
            }
        }
    }

    /// Whether `user` has a socket on this process.
    pub fn has_user(&self, user: UserId) -> bool {
        self.lock().users.contains_key(&user)
    }

    fn has_track(&self, track: TrackId) -> bool {
        self.lock().tracks.contains_key(&track)
    }

    fn to_user(&self, user: UserId, frame: &Arc<str>) {
        let inner = self.lock();
        for id in inner.users.get(&user).into_iter().flatten() {
            if let Some(conn) = inner.conns.get(id) {
                conn.out.push(frame.clone());
            }
        }
    }

    fn to_track(&self, track: TrackId, frame: &Arc<str>) {
        let inner = self.lock();
        for id in inner.tracks.get(&track).into_iter().flatten() {
            if let Some(conn) = inner.conns.get(id) {
                conn.out.push(frame.clone());
            }
        }
    }

    /// Sockets open on this process.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }
}

fn frame(value: Value) -> Arc<str> {
    Arc::from(value.to_string())
}

/// Delivers one bus event to this process's sockets.
async fn dispatch(state: &AppState, event: Event) {
    let hub = &state.realtime.hub;
    match event {
        Event::MessageNew { message } => {
            let out = frame(json!({"type": "message.new", "message": MessageView::from(&message)}));
            hub.to_user(message.sender, &out);
            hub.to_user(message.recipient, &out);
        }
        Event::MessageRead { conversation_id, reader, other, up_to } => {
            let out = frame(json!({
                "type": "message.read",
                "conversation_id": conversation_id.to_string(),
                "user_id": reader.to_string(),
                "up_to": up_to.to_string(),
            }));
            hub.to_user(reader, &out);
            hub.to_user(other, &out);
        }
        Event::Counters { track_id, likes_count, reposts_count, comment_count, playback_count } => {
            let out = frame(json!({
                "type": "counters",
                "track_id": track_id.to_string(),
                "likes_count": likes_count,
                "reposts_count": reposts_count,
                "comment_count": comment_count,
                "playback_count": playback_count,
            }));
            hub.to_track(track_id, &out);
        }
        Event::CommentNew { comment } => {
            if !hub.has_track(comment.track_id) {
                return;
            }
            match comment_frame(state, &comment).await {
                Some(out) => hub.to_track(comment.track_id, &out),
                None => tracing::debug!("a new comment's author is gone"),
            }
        }
        Event::Notification { notification } => {
            if !hub.has_user(notification.user_id) {
                return;
            }
            match notification_views(state, std::slice::from_ref(&notification)).await {
                Ok(views) => {
                    for view in views {
                        hub.to_user(
                            notification.user_id,
                            &frame(json!({"type": "notification", "notification": view})),
                        );
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot render a notification for a socket"),
            }
        }
    }
}

async fn comment_frame(state: &AppState, comment: &Comment) -> Option<Arc<str>> {
    let users = state.social.summaries(&[comment.user_id]).await.ok()?;
    let user = UserSummaryView::from(users.get(&comment.user_id)?);
    Some(frame(json!({
        "type": "comment.new",
        "track_id": comment.track_id.to_string(),
        "comment": {
            "id": comment.id.to_string(),
            "user": {"id": user.id, "username": user.username, "display_name": user.display_name},
            "body": comment.body,
            "timestamp_ms": comment.timestamp_ms,
            "reply_to": comment.reply_to.map(|id| id.to_string()),
            "created_at": comment.created_at,
        },
    })))
}

/// A track's status change, to its owner's sockets here.
fn track_status(state: &AppState, announced: &crate::status_feed::Announced) {
    let Some(owner) = announced.owner_id.map(UserId) else {
        return;
    };
    if !state.realtime.hub.has_user(owner) {
        return;
    }
    if let Some(status) = crate::tracks::TrackStatus::announced(announced) {
        state.realtime.hub.to_user(owner, &frame(json!({"type": "track.status", "status": status})));
    }
}

/// Publishes a track's committed counts (in the background: the request that changed them
/// has committed and answers at once).
pub(crate) fn publish_counters(state: &AppState, track: TrackId) {
    let state = state.clone();
    tokio::spawn(async move {
        let plays = match state.plays.db().counts(&[track]).await {
            Ok(counts) => counts.first().map_or(0, |counted| counted.playback_count),
            Err(_) => {
                tracing::warn!(%track, "cannot count a track's plays for its watchers");
                return;
            }
        };
        send_counters(&state, &[(track, plays)]).await;
    });
}

/// Publishes the counts of the tracks a flush of plays changed (in the background).
pub(crate) fn publish_play_counts(state: &AppState, counted: Vec<waveline_shared::db::plays::Counted>) {
    if counted.is_empty() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let plays: Vec<(TrackId, i64)> = counted.iter().map(|c| (c.track, c.playback_count)).collect();
        send_counters(&state, &plays).await;
    });
}

/// One `counters` event per track, with its likes, reposts and comments counted now.
async fn send_counters(state: &AppState, plays: &[(TrackId, i64)]) {
    for chunk in plays.chunks(waveline_shared::documents::MAX_COUNTED_TRACKS) {
        send_counters_of(state, chunk).await;
    }
}

async fn send_counters_of(state: &AppState, plays: &[(TrackId, i64)]) {
    let tracks: Vec<TrackId> = plays.iter().map(|(track, _)| *track).collect();
    let stats = state.social.track_stats(&tracks, None).await;
    let comments = state.documents.count_comments_of(&tracks).await;
    let (Ok(stats), Ok(comments)) = (stats, comments) else {
        tracing::warn!(tracks = tracks.len(), "cannot count tracks' likes and comments for their watchers");
        return;
    };
    for &(track, playback_count) in plays {
        let counts = stats.get(&track).copied().unwrap_or_default();
        let event = Event::Counters {
            track_id: track,
            likes_count: counts.likes,
            reposts_count: counts.reposts,
            comment_count: i64::try_from(comments.get(&track).copied().unwrap_or(0)).unwrap_or(i64::MAX),
            playback_count,
        };
        if let Err(err) = state.realtime.bus.publish(&event).await {
            tracing::warn!(error = %err, "could not publish a track's counts");
        }
    }
}

/// Sends a stored notification live, to every socket of its account on any process; when the
/// account has none, as a push to its devices (when pushes are on). `preview` is a message's
/// text.
pub(crate) async fn deliver_notification(state: &AppState, notification: Notification, preview: Option<&str>) {
    // The push is decided first, so by the time a socket sees the notification, whether it
    // was also pushed is settled.
    if state.push.is_on() {
        push_notification(state, &notification, preview).await;
    }
    if let Err(err) = state.realtime.bus.publish(&Event::Notification { notification }).await {
        tracing::warn!(error = %err, "could not publish a notification; it is stored");
    }
}

/// Pushes a notification to its account's devices if it has no live socket anywhere.
async fn push_notification(state: &AppState, notification: &Notification, preview: Option<&str>) {
    let user = notification.user_id;
    let actor = notification.actor;
    match state.realtime.store.online(user).await {
        Ok(true) => return,
        Ok(false) => {}
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell whether the account is online; no push");
            return;
        }
    }
    let name = match actor {
        Some(actor) => {
            state.social.summaries(&[actor]).await.ok().and_then(|found| found.get(&actor).map(|u| u.username.clone()))
        }
        None => None,
    };
    let message = match waveline_shared::push::for_notification(notification, name.as_deref(), preview) {
        Ok(message) => message,
        Err(err) => {
            tracing::warn!(error = %err, "a notification's push does not fit; none sent");
            return;
        }
    };
    match state.push.enqueue(state.tracks.pool(), user, &message).await {
        Ok(true) => state.publish_soon(),
        Ok(false) => {}
        Err(err) => tracing::warn!(error = %err, "could not queue a push"),
    }
}

/// A ticket.
#[derive(Debug, Object)]
struct Ticket {
    /// Pass as `?ticket=` to `GET /v1/ws` within `expires_in` seconds; it works once.
    ticket: String,
    expires_in: u64,
}

#[derive(ApiResponse)]
enum TicketResponse {
    /// A new ticket.
    #[oai(status = 201)]
    Created(Json<Ticket>),
}

/// The socket's upgrade (101), or the reason there is none.
#[derive(Debug)]
pub struct Upgrade(poem::Response);

impl IntoResponse for Upgrade {
    fn into_response(self) -> poem::Response {
        self.0
    }
}

impl ApiResponse for Upgrade {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "Switching to the WebSocket protocol; then JSON text frames (see the README).",
                status: Some(101),
                status_range: None,
                content: vec![],
                headers: vec![],
            }],
        }
    }

    fn register(_: &mut Registry) {}
}

fn ticket_hash(ticket: &str) -> Vec<u8> {
    Sha256::digest(ticket.as_bytes()).to_vec()
}

/// Whether a browser page at `origin` may open a socket with the visitor's cookie.
fn origin_allowed(state: &AppState, origin: &str) -> bool {
    let own = state.security.public_url.origin().ascii_serialization();
    origin == own || state.security.cors_origins.iter().any(|allowed| allowed == origin)
}

impl RealtimeApi {
    /// The session the socket acts for.
    async fn session(&self, req: &Request, auth: MaybeAuth, ticket: Option<&str>) -> Result<Session, ApiError> {
        if let Some(ticket) = ticket {
            let refused = || ApiError::unauthorized("the ticket is unknown, used or expired");
            let (user, session) =
                self.state.realtime.store.take_ticket(&ticket_hash(ticket)).await?.ok_or_else(refused)?;
            let row = self.state.users.session_user(session, user).await?.ok_or_else(refused)?;
            return Ok(Session { user: row, id: session, expires_at: Utc::now() + TICKET_TTL });
        }
        match auth {
            MaybeAuth::Bearer(bearer) => Ok(bearer.0),
            MaybeAuth::Cookie(cookie) => {
                if let Some(origin) = req.header("origin")
                    && !origin_allowed(&self.state, origin)
                {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "origin_not_allowed",
                        "a socket opened with the session cookie must come from an allowed origin",
                    ));
                }
                Ok(cookie.0)
            }
            MaybeAuth::Anonymous => {
                Err(ApiError::unauthorized("a socket needs a session cookie, a bearer token or a ticket"))
            }
        }
    }
}

#[OpenApi(tag = "Tag::Realtime")]
impl RealtimeApi {
    /// A single-use ticket for opening the socket without a cookie (valid 30 s, any replica).
    #[oai(path = "/v1/ws/tickets", method = "post")]
    async fn ticket(&self, auth: Auth) -> Result<TicketResponse, ApiError> {
        let session = auth.session();
        let bytes: [u8; 32] = rand::random();
        let ticket = URL_SAFE_NO_PAD.encode(bytes);
        let expires_at = Utc::now() + TICKET_TTL;
        if !self
            .state
            .realtime
            .store
            .create_ticket(&ticket_hash(&ticket), session.user.id, session.id, expires_at)
            .await?
        {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_tickets",
                "this account holds as many unused tickets as it may",
            )
            .with_header("retry-after", TICKET_TTL.as_secs().to_string()));
        }
        Ok(TicketResponse::Created(Json(Ticket { ticket, expires_in: TICKET_TTL.as_secs() })))
    }

    /// The realtime socket (WebSocket upgrade). Authenticate with the session cookie (from an
    /// allowed `Origin`), a bearer token, or `?ticket=`. Frames are documented in the README.
    #[oai(path = "/v1/ws", method = "get")]
    async fn socket(
        &self,
        /// A ticket from `POST /v1/ws/tickets`.
        #[oai(validator(max_length = 64))]
        ticket: Query<Option<String>>,
        auth: MaybeAuth,
        req: &Request,
    ) -> Result<Upgrade, ApiError> {
        let session = self.session(req, auth, ticket.0.as_deref()).await?;
        let socket = WebSocket::from_request_without_body(req).await.map_err(|_| {
            ApiError::bad_request("websocket_required", "this route speaks WebSocket: send an upgrade request")
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Outgoing { tx, queued: Arc::new(AtomicUsize::new(0)), kill: CancellationToken::new() };
        let hub = self.state.realtime.hub.clone();
        let revoked = CancellationToken::new();
        let Some(id) = hub.register(session.user.id, session.id, out.clone(), revoked.clone()) else {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sockets",
                format!("an account may hold {MAX_SOCKETS_PER_ACCOUNT} sockets on one server"),
            ));
        };
        let state = self.state.clone();
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = 4096;
        config.write_buffer_size = 0;
        config.max_message_size = Some(PROTOCOL_MAX_BYTES);
        config.max_frame_size = Some(PROTOCOL_MAX_BYTES);
        let upgrade = socket.config(config).on_upgrade(move |stream| async move {
            let user = session.user.id;
            if let Err(err) = state.realtime.store.connected(state.realtime.replica, user).await {
                tracing::warn!(error = %err, "could not record a socket's presence");
            }
            metrics::counter!("waveline_ws_opened_total").increment(1);
            Connection { state: state.clone(), session, id, rx, out, revoked }.run(stream).await;
            state.realtime.hub.unregister(id);
            if let Err(err) = state.realtime.store.disconnected(state.realtime.replica, user).await {
                tracing::warn!(error = %err, "could not record a socket's end");
            }
        });
        Ok(Upgrade(upgrade.into_response()))
    }
}

/// What a client may send.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum ClientFrame {
    #[serde(rename = "subscribe")]
    Subscribe { track_id: String },
    #[serde(rename = "unsubscribe")]
    Unsubscribe { track_id: String },
    #[serde(rename = "message.send")]
    MessageSend { to: String, body: String, client_id: String },
    #[serde(rename = "message.read")]
    MessageRead { conversation_id: String, up_to: String },
    #[serde(rename = "ping")]
    Ping,
}

const CLIENT_TYPES: [&str; 5] = ["subscribe", "unsubscribe", "message.send", "message.read", "ping"];

/// One open socket.
struct Connection {
    state: AppState,
    session: Session,
    id: u64,
    rx: mpsc::UnboundedReceiver<Arc<str>>,
    out: Outgoing,
    revoked: CancellationToken,
}

/// Why a socket ended, for the close frame.
enum End {
    /// The peer closed or vanished.
    Gone,
    /// Too many errors or frames, or it did not read.
    Policy(&'static str),
    /// The process is stopping: reconnect (to another replica).
    Stopping,
}

impl Connection {
    async fn run(mut self, stream: WebSocketStream) {
        let (mut sink, mut source) = stream.split();
        let mut last_heard = Instant::now();
        let mut last_ping = Instant::now();
        let mut check = tokio::time::interval(CHECK_EVERY);
        let mut errors: (Instant, u32) = (Instant::now(), 0);
        let mut frames: (Instant, u32) = (Instant::now(), 0);
        let closing = self.state.realtime.hub.closing.clone();
        let end = loop {
            tokio::select! {
                () = closing.cancelled() => break End::Stopping,
                () = self.revoked.cancelled() => break End::Policy("the session ended, or the account changed: sign in again"),
                () = self.out.kill.cancelled() => break End::Policy("the client is not reading its frames"),
                outgoing = self.rx.recv() => {
                    let Some(text) = outgoing else { break End::Gone };
                    self.out.queued.fetch_sub(text.len(), Ordering::AcqRel);
                    if sink.send(Frame::Text(text.to_string())).await.is_err() {
                        break End::Gone;
                    }
                }
                incoming = source.next() => {
                    let Some(Ok(incoming)) = incoming else { break End::Gone };
                    last_heard = Instant::now();
                    let text = match incoming {
                        Frame::Text(text) => text,
                        Frame::Binary(_) => {
                            self.error("invalid_frame", "frames are JSON text", None);
                            if over(&mut errors, MAX_ERRORS, Duration::from_secs(60)) {
                                break End::Policy("too many invalid frames");
                            }
                            continue;
                        }
                        Frame::Close(_) => break End::Gone,
                        Frame::Ping(_) | Frame::Pong(_) => continue,
                    };
                    if over(&mut frames, MAX_FRAMES_PER_SECOND, Duration::from_secs(1)) {
                        break End::Policy("too many frames");
                    }
                    if !self.handle(&text).await && over(&mut errors, MAX_ERRORS, Duration::from_secs(60)) {
                        break End::Policy("too many refused frames");
                    }
                }
                _ = check.tick() => {
                    if last_heard.elapsed() > SILENT_FOR {
                        metrics::counter!("waveline_ws_dead_peers_total").increment(1);
                        break End::Gone;
                    }
                    if last_ping.elapsed() >= PING_EVERY {
                        last_ping = Instant::now();
                        if sink.send(Frame::Ping(Vec::new())).await.is_err() {
                            break End::Gone;
                        }
                    }
                }
            }
        };
        match end {
            End::Policy(reason) => {
                metrics::counter!("waveline_ws_closed_for_policy_total").increment(1);
                let _ = sink.send(Frame::Close(Some((CloseCode::Policy, reason.to_owned())))).await;
            }
            End::Stopping => {
                let _ = sink.send(Frame::Close(Some((CloseCode::Away, "the server is restarting".to_owned())))).await;
            }
            End::Gone => {}
        }
        let _ = sink.close().await;
    }

    /// Sends an `error` frame to this socket.
    fn error(&self, code: &str, message: &str, reference: Option<&str>) {
        self.out.push(frame(json!({"type": "error", "code": code, "message": message, "ref": reference})));
    }

    /// Handles one client frame; `false` when it was refused.
    async fn handle(&mut self, text: &str) -> bool {
        if text.len() > MAX_FRAME_BYTES {
            self.error("frame_too_large", &format!("frames are at most {MAX_FRAME_BYTES} bytes"), None);
            return false;
        }
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            self.error("invalid_frame", "not JSON", None);
            return false;
        };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            self.error("unknown_type", &format!("unknown frame type {kind:?}"), None);
            return false;
        }
        let parsed = match serde_json::from_value::<ClientFrame>(value) {
            Ok(parsed) => parsed,
            Err(err) => {
                self.error("invalid_frame", &format!("{kind}: {err}"), None);
                return false;
            }
        };
        let (reference, result) = match parsed {
            ClientFrame::Ping => {
                self.out.push(frame(json!({"type": "pong"})));
                return true;
            }
            ClientFrame::Subscribe { track_id } => {
                let result = self.subscribe(&track_id).await;
                (track_id, result)
            }
            ClientFrame::Unsubscribe { track_id } => {
                let result = track_id
                    .parse::<TrackId>()
                    .map(|track| self.state.realtime.hub.unsubscribe(self.id, track))
                    .map_err(|_| ApiError::not_found("track"));
                (track_id, result)
            }
            ClientFrame::MessageSend { to, body, client_id } => {
                let result = crate::inbox::send_message(
                    &self.state,
                    &self.session,
                    crate::inbox::To::Username(&to),
                    &body,
                    client_id.clone(),
                )
                .await
                .map(|_| ());
                (client_id, result)
            }
            ClientFrame::MessageRead { conversation_id, up_to } => {
                let result = crate::inbox::mark_read(&self.state, self.session.user.id, &conversation_id, &up_to).await;
                (conversation_id, result)
            }
        };
        match result {
            Ok(()) => true,
            Err(err) => {
                self.error(err.code, &err.message, Some(&reference));
                false
            }
        }
    }

    async fn subscribe(&self, track_id: &str) -> Result<(), ApiError> {
        let id = crate::parse_track_id(track_id)?;
        let track = self.state.tracks.details(id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        if !may_see(track.owner_id, track.visibility, Some(&self.session)) {
            return Err(ApiError::not_found("track"));
        }
        if !self.state.realtime.hub.subscribe(self.id, id) {
            return Err(ApiError::conflict(
                "too_many_subscriptions",
                format!("a socket watches at most {MAX_SUBSCRIPTIONS} tracks"),
            ));
        }
        Ok(())
    }
}

/// Counts one more event in a window of `width`; `true` when that passes `max`.
fn over(window: &mut (Instant, u32), max: u32, width: Duration) -> bool {
    if window.0.elapsed() > width {
        *window = (Instant::now(), 0);
    }
    window.1 += 1;
    window.1 > max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_that_does_not_read_is_cut_off_at_the_bound() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let out = Outgoing { tx, queued: Arc::new(AtomicUsize::new(0)), kill: CancellationToken::new() };
        let big: Arc<str> = Arc::from("x".repeat(100 * 1024));
        for _ in 0..10 {
            out.push(big.clone());
        }
        assert!(!out.kill.is_cancelled(), "1000 KiB fits");
        out.push(big.clone());
        assert!(out.kill.is_cancelled(), "past 1 MiB the socket is to be closed");
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 10, "nothing past the bound was queued");
    }

    #[test]
    fn windows_count_and_reset() {
        let mut window = (Instant::now(), 0);
        assert!((0..3).all(|_| !over(&mut window, 3, Duration::from_secs(60))));
        assert!(over(&mut window, 3, Duration::from_secs(60)));
        let mut old = (Instant::now() - Duration::from_secs(61), 100);
        assert!(!over(&mut old, 3, Duration::from_secs(60)));
    }

    #[test]
    fn the_hub_bounds_sockets_and_subscriptions() {
        let hub = Hub::default();
        let user = UserId::new();
        let out = || {
            let (tx, _rx) = mpsc::unbounded_channel();
            Outgoing { tx, queued: Arc::new(AtomicUsize::new(0)), kill: CancellationToken::new() }
        };
        let session = Uuid::now_v7();
        let revoked = CancellationToken::new();
        let ids: Vec<u64> = (0..MAX_SOCKETS_PER_ACCOUNT)
            .filter_map(|_| hub.register(user, session, out(), revoked.child_token()))
            .collect();
        assert_eq!(ids.len(), MAX_SOCKETS_PER_ACCOUNT);
        assert!(hub.register(user, session, out(), CancellationToken::new()).is_none());
        hub.revoke(Some(session), None);
        assert!(hub.lock().conns.values().all(|conn| conn.revoked.is_cancelled()));
        for _ in 0..MAX_SUBSCRIPTIONS {
            assert!(hub.subscribe(ids[0], TrackId::new()));
        }
        assert!(!hub.subscribe(ids[0], TrackId::new()));
        for id in ids {
            hub.unregister(id);
        }
        assert_eq!(hub.connections(), 0);
        assert!(!hub.has_user(user));
        assert!(hub.lock().tracks.is_empty());
    }
}
