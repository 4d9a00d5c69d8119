//! Which sessions are live, and their accounts, without a database round trip per request.
//!
//! Every authenticated request needs the account behind its access token, and needs to know
//! that the token's session (`sid`) has not ended and the account is not suspended. The
//! [`SessionCache`] keeps that answer for each session asked about. Triggers (migration
//! `20261129000008_session_cache.sql`) announce on [`CHANNEL`] every change that can end a
//! session or alter its account: a session's end or deletion (logout, a reused refresh token,
//! a suspension, a password reset, the family's lifetime, the idle clean-up), and an account's
//! change of role, suspension, identity, password or verification, or its deletion. The
//! process's one listener (see [`crate::status_feed`]) hears them and the cache drops the
//! session, or every session of the account, so the next request reads the database again.
//! A revocation thus reaches every replica within the time a notification takes; the process
//! that made it (a logout, a reused refresh token, a suspension, a password reset) also forgets
//! at once, so its own next request never sees the session live.
//!
//! As for the status cache: notifications are not durable, so the cache is emptied whenever
//! some may have been lost (the listener reconnects) and bypassed while the listener is down;
//! a read in flight when a notification arrives is not kept. Concurrent misses of one session
//! share one read. An answer is kept at most [`CACHE_TTL`], as a backstop, and the cache holds
//! at most [`CACHE_CAPACITY`] sessions; past that it starts afresh. The access token's own
//! signature and expiry are checked on every request before the cache is asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Deserialize;
use waveline_shared::db::{DbError, PgUsers, UserRow};
use waveline_shared::domain::UserId;

/// The channel the triggers notify.
pub const CHANNEL: &str = "waveline_session";

/// How many sessions the cache holds before it starts afresh.
pub const CACHE_CAPACITY: usize = 65_536;

/// How long an answer is kept, however quiet the notifications.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// What the triggers announce: a session to forget, or every session of an account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Announced {
    #[serde(default)]
    pub session: Option<uuid::Uuid>,
    #[serde(default)]
    pub user: Option<uuid::Uuid>,
}

type Answer = Result<Option<UserRow>, Arc<DbError>>;
type Load = Shared<BoxFuture<'static, Answer>>;

enum Slot {
    /// Read from the database by the load numbered so; callers wait for it.
    Loading { number: u64, user: UserId, load: Load },
    /// The account while the session is live (`None`: the session has ended, or its account
    /// is suspended or gone).
    Known { user: UserId, account: Option<UserRow>, at: Instant },
}

impl Slot {
    fn user(&self) -> UserId {
        match self {
            Slot::Loading { user, .. } | Slot::Known { user, .. } => *user,
        }
    }
}

/// Live sessions and their accounts, current while the listener is connected.
#[derive(Default)]
pub struct SessionCache {
    slots: Mutex<HashMap<uuid::Uuid, Slot>>,
    /// Whether notifications are being heard (else the cache is bypassed).
    live: AtomicBool,
    loads: AtomicU64,
    /// Every session or account change heard, for what else holds sessions (open sockets).
    changes: std::sync::OnceLock<tokio::sync::broadcast::Sender<Announced>>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache").field("live", &self.live).finish_non_exhaustive()
    }
}

fn count(result: &'static str) {
    metrics::counter!("waveline_session_cache_total", "result" => result).increment(1);
}

impl SessionCache {
    fn slots(&self) -> MutexGuard<'_, HashMap<uuid::Uuid, Slot>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A notification: forget the session, or every session of the account (a read in
    /// flight for them is not kept either).
    pub(crate) fn heard(&self, announced: &Announced) {
        let _ = self.changes().send(announced.clone());
        let mut slots = self.slots();
        if let Some(session) = announced.session {
            slots.remove(&session);
        }
        if let Some(user) = announced.user {
            slots.retain(|_, slot| slot.user().0 != user);
        }
    }

    fn changes(&self) -> &tokio::sync::broadcast::Sender<Announced> {
        self.changes.get_or_init(|| tokio::sync::broadcast::channel(1024).0)
    }

    /// Session and account changes from now on: a session ended, or an account changed in
    /// what a session may do (suspended, deleted, its password reset…).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Announced> {
        self.changes().subscribe()
    }

    /// Forgets a session this process just ended (so its next request sees it ended, before
    /// the notification arrives).
    pub fn forget_session(&self, session: uuid::Uuid) {
        self.heard(&Announced { session: Some(session), user: None });
    }

    /// Forgets every session of an account this process just changed.
    pub fn forget_user(&self, user: UserId) {
        self.heard(&Announced { session: None, user: Some(user.0) });
    }

    pub(crate) fn clear(&self) {
        self.slots().clear();
    }

    /// Whether notifications are heard; either way the cache starts empty.
    pub(crate) fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.clear();
    }

    /// The account of `user` if `session` is its live session and the account exists and is
    /// not suspended: from the cache while the notifications keep it current, else from the
    /// database (one read for every caller that asks meanwhile).
    pub async fn account(&self, users: &PgUsers, session: uuid::Uuid, user: UserId) -> Answer {
        let read = |users: PgUsers| async move { users.session_user(session, user).await.map_err(Arc::new) };
        if !self.live.load(Ordering::SeqCst) {
            count("bypass");
            return read(users.clone()).await;
        }
        let (number, load) = {
            let mut slots = self.slots();
            match slots.get(&session) {
                // A session belongs to one account; a token naming another is read, not cached.
                Some(slot) if slot.user() != user => (None, read(users.clone()).boxed().shared()),
                Some(Slot::Known { account, at, .. }) if at.elapsed() < CACHE_TTL => {
                    count("hit");
                    return Ok(account.clone());
                }
                Some(Slot::Loading { number, load, .. }) => (Some(*number), load.clone()),
                _ => {
                    count("miss");
                    if slots.len() >= CACHE_CAPACITY {
                        slots.clear();
                    }
                    let number = self.loads.fetch_add(1, Ordering::Relaxed);
                    let load = read(users.clone()).boxed().shared();
                    slots.insert(session, Slot::Loading { number, user, load: load.clone() });
                    (Some(number), load)
                }
            }
        };
        let Some(number) = number else {
            count("bypass");
            return load.await;
        };
        let result = load.await;
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&session)
            && matches!(slot, Slot::Loading { number: loading, .. } if *loading == number)
        {
            // A notification heard meanwhile would have removed the slot: what is read here
            // is the latest.
            match &result {
                Ok(account) => *slot = Slot::Known { user, account: account.clone(), at: Instant::now() },
                Err(_) => {
                    slots.remove(&session);
                }
            }
        }
        result
    }
}
