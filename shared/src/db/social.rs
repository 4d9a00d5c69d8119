//! The social layer's relational side: profiles, follows, blocks, likes, reposts and
//! playlists (migration `…_social.sql`). Comments and activities are documents
//! ([`crate::documents`]).
//!
//! - **Counts are counted, not kept.** Every count (followers, likes, a playlist's tracks) is
//!   a `count(*)` over the rows, by an index that covers it, when it is asked for. No counter
//!   column can drift from its rows, whatever runs at once: 200 accounts liking one track at
//!   once give exactly 200. The cost grows with the count (one index-only scan of the object's
//!   entries); a counter table maintained by triggers would be the next step for objects with
//!   millions of likes.
//! - **Visibility is decided in the queries.** A viewer sees a track when it is theirs, when
//!   they are an admin, or when it is public and has a ready revision; a playlist when it is
//!   theirs, when they are an admin, or when it is public. Lists and counts of others' marks
//!   skip what the viewer cannot see, and profile counts are those a stranger sees.
//! - **Follows and blocks of one pair are serialised** (a transaction-scoped advisory lock on
//!   the pair), so a follow cannot slip in beside a block that removes it. An account's own
//!   follows and blocks are serialised by a lock on its row (`FOR NO KEY UPDATE`, which does
//!   not stop others' likes and follows from referencing it), so the limits hold exactly.
//! - **Lists** are newest first, with a keyset cursor: `(created_at, id)` of the last item.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::{DbError, Visibility};
use crate::domain::{PlaylistId, TrackId, UserId};

/// The most accounts one account may follow (the feed merges at most this many).
pub const MAX_FOLLOWINGS: i64 = crate::documents::MAX_FEED_ACTORS as i64;
/// The most accounts one account may block.
pub const MAX_BLOCKS: i64 = 10_000;
/// The most playlists one account may have.
pub const MAX_PLAYLISTS: i64 = 1_000;
/// The most tracks one playlist holds.
pub const PLAYLIST_MAX_TRACKS: usize = 500;

/// Who is looking: decides what lists and counts include.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Viewer {
    /// `None` for an anonymous listener.
    pub id: Option<UserId>,
    pub admin: bool,
}

impl Viewer {
    /// A stranger: anonymous, no rights.
    pub const STRANGER: Viewer = Viewer { id: None, admin: false };
}

/// A track `t` the viewer (`$1`, `$2` = admin) may see in lists.
const TRACK_VISIBLE: &str = "(t.owner_id = $1 OR $2 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))";
/// A playlist `p` the viewer may see.
const PLAYLIST_VISIBLE: &str = "(p.owner_id = $1 OR $2 OR p.visibility = 'public')";

/// A position in a list: the last item's `(created_at, id)`.
pub type Keyset = (DateTime<Utc>, Uuid);

/// A page of a list, newest first.
#[derive(Debug, Clone)]
pub struct Listed<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Keyset>,
}

fn listed<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> Keyset) -> Listed<T> {
    let limit = limit.max(1) as usize;
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(key) } else { None };
    Listed { items, next }
}

/// An account as others see it in lists.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserSummary {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
}

/// An account in a list of follows or blocks, with when the relation began.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Related {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub since: DateTime<Utc>,
}

/// A profile, with the counts a stranger sees.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Profile {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub bio: String,
    pub created_at: DateTime<Utc>,
    pub followers_count: i64,
    pub followings_count: i64,
    /// Public tracks with a ready revision.
    pub track_count: i64,
    /// Public playlists.
    pub playlist_count: i64,
    /// Likes of public tracks and playlists.
    pub likes_count: i64,
    /// Reposts of public tracks and playlists.
    pub reposts_count: i64,
}

/// How a follow or block went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relate {
    /// Done.
    Done,
    /// It was so already: nothing changed.
    Already,
    /// One of the two blocks the other.
    Blocked,
    /// The account has as many as it may.
    Full,
}

/// A like or a repost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Like,
    Repost,
}

/// What is liked or reposted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Track(TrackId),
    Playlist(PlaylistId),
}

impl Mark {
    fn table(self, target: Target) -> (&'static str, &'static str) {
        match (self, target) {
            (Mark::Like, Target::Track(_)) => ("track_likes", "track_id"),
            (Mark::Repost, Target::Track(_)) => ("track_reposts", "track_id"),
            (Mark::Like, Target::Playlist(_)) => ("playlist_likes", "playlist_id"),
            (Mark::Repost, Target::Playlist(_)) => ("playlist_reposts", "playlist_id"),
        }
    }

    fn tables(self) -> (&'static str, &'static str) {
        match self {
            Mark::Like => ("track_likes", "playlist_likes"),
            Mark::Repost => ("track_reposts", "playlist_reposts"),
        }
    }
}

impl Target {
    fn id(self) -> Uuid {
        match self {
            Target::Track(id) => id.0,
            Target::Playlist(id) => id.0,
        }
    }
}

/// One item of an account's likes or reposts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    pub target: Target,
    pub created_at: DateTime<Utc>,
}

/// The counts of a track or playlist, and the viewer's own marks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub likes: i64,
    pub reposts: i64,
    /// Whether the viewer liked it (`false` for anonymous viewers).
    pub liked: bool,
    pub reposted: bool,
}

/// A playlist as a viewer sees it: its counts cover only the tracks they may see.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PlaylistRow {
    pub id: PlaylistId,
    pub owner_id: UserId,
    pub owner_username: String,
    pub owner_display_name: String,
    pub title: String,
    pub description: String,
    #[sqlx(try_from = "String")]
    pub visibility: VisibilityText,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The tracks the viewer may see.
    pub track_count: i64,
    /// Their total duration.
    pub duration_ms: i64,
}

/// A stored visibility, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisibilityText(pub Visibility);

impl TryFrom<String> for VisibilityText {
    type Error = DbError;

    fn try_from(text: String) -> Result<VisibilityText, DbError> {
        Visibility::parse(&text).map(VisibilityText).ok_or_else(|| DbError::Invalid(format!("visibility {text:?}")))
    }
}

/// A new playlist, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewPlaylist {
    pub owner: UserId,
    pub title: String,
    pub description: String,
    pub visibility: Visibility,
    /// Distinct, at most [`PLAYLIST_MAX_TRACKS`].
    pub tracks: Vec<TrackId>,
}

/// A playlist edit: `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct PlaylistPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub visibility: Option<Visibility>,
}

/// Why a playlist could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaylistRefusal {
    /// A track that does not exist or the owner cannot see.
    UnknownTrack(TrackId),
    /// The owner has [`MAX_PLAYLISTS`] already.
    Full,
    /// The playlist is gone.
    Gone,
}

/// What an account's deletion removed from the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedAccount {
    pub tracks: Vec<TrackId>,
    pub playlists: Vec<PlaylistId>,
}

/// The social tables in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSocial {
    pool: PgPool,
}

const PLAYLIST_SELECT: &str = "
    SELECT p.id, p.owner_id, u.username AS owner_username, u.display_name AS owner_display_name,
           p.title, p.description, p.visibility, p.created_at, p.updated_at,
           v.track_count, v.duration_ms
    FROM playlists p
    JOIN users u ON u.id = p.owner_id
    CROSS JOIN LATERAL (
        SELECT count(*) AS track_count, coalesce(sum(t.duration_ms), 0)::bigint AS duration_ms
        FROM playlist_tracks pt JOIN tracks t ON t.id = pt.track_id
        WHERE pt.playlist_id = p.id
          AND (t.owner_id = $1 OR $2 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))
    ) v";

/// A profile with the counts a stranger sees (of `users u`).
const PROFILE_SELECT: &str = "
    SELECT u.id, u.username, u.display_name, u.bio, u.created_at,
        (SELECT count(*) FROM follows f WHERE f.followee_id = u.id) AS followers_count,
        (SELECT count(*) FROM follows f WHERE f.follower_id = u.id) AS followings_count,
        (SELECT count(*) FROM tracks t WHERE t.owner_id = u.id
             AND t.visibility = 'public' AND t.ready_revision IS NOT NULL) AS track_count,
        (SELECT count(*) FROM playlists p WHERE p.owner_id = u.id AND p.visibility = 'public')
            AS playlist_count,
        (SELECT count(*) FROM track_likes l JOIN tracks t ON t.id = l.track_id WHERE l.user_id = u.id
             AND t.visibility = 'public' AND t.ready_revision IS NOT NULL)
          + (SELECT count(*) FROM playlist_likes l JOIN playlists p ON p.id = l.playlist_id
             WHERE l.user_id = u.id AND p.visibility = 'public') AS likes_count,
        (SELECT count(*) FROM track_reposts r JOIN tracks t ON t.id = r.track_id WHERE r.user_id = u.id
             AND t.visibility = 'public' AND t.ready_revision IS NOT NULL)
          + (SELECT count(*) FROM playlist_reposts r JOIN playlists p ON p.id = r.playlist_id
             WHERE r.user_id = u.id AND p.visibility = 'public') AS reposts_count
    FROM users u";

/// Locks the pair `(a, b)` (in either order) for the rest of the transaction.
async fn lock_pair(tx: &mut sqlx::PgConnection, a: UserId, b: UserId) -> Result<(), DbError> {
    let (low, high) = if a.0 < b.0 { (a.0, b.0) } else { (b.0, a.0) };
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text || $2::text, 7106))")
        .bind(low)
        .bind(high)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Locks an account's row against its own concurrent follows and blocks; `false` when the
/// account is gone.
async fn lock_account(tx: &mut sqlx::PgConnection, id: UserId) -> Result<bool, DbError> {
    Ok(sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .is_some())
}

impl PgSocial {
    pub fn new(pool: PgPool) -> PgSocial {
        PgSocial { pool }
    }

    /// A profile by username, with the counts a stranger sees.
    pub async fn profile(&self, username: &str) -> Result<Option<Profile>, DbError> {
        Ok(sqlx::query_as::<_, Profile>(sqlx::AssertSqlSafe(format!(
            "{PROFILE_SELECT} WHERE u.username = $1 AND u.role <> 'system'"
        )))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The profiles of some accounts (those that exist, but the system account), in the order
    /// of `ids`.
    pub async fn profiles(&self, ids: &[UserId]) -> Result<Vec<Profile>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows = sqlx::query_as::<_, Profile>(sqlx::AssertSqlSafe(format!(
            "{PROFILE_SELECT} WHERE u.id = ANY($1) AND u.role <> 'system'"
        )))
        .bind(&keys)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<UserId, Profile> = rows.into_iter().map(|row| (row.id, row)).collect();
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// An account's summary by username (the system account has none).
    pub async fn summary_by_username(&self, username: &str) -> Result<Option<UserSummary>, DbError> {
        Ok(sqlx::query_as::<_, UserSummary>(
            "SELECT id, username, display_name FROM users WHERE username = $1 AND role <> 'system'",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The summaries of some accounts (those that exist).
    pub async fn summaries(&self, ids: &[UserId]) -> Result<HashMap<UserId, UserSummary>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows = sqlx::query_as::<_, UserSummary>("SELECT id, username, display_name FROM users WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|row| (row.id, row)).collect())
    }

    /// Changes an account's display name and bio (`None` leaves one alone); `false` when the
    /// account is gone.
    pub async fn update_profile(
        &self,
        id: UserId,
        display_name: Option<&str>,
        bio: Option<&str>,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE users SET display_name = coalesce($2, display_name), bio = coalesce($3, bio) WHERE id = $1",
        )
        .bind(id)
        .bind(display_name)
        .bind(bio)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `follower` follows `followee` (idempotent). Refused when either blocks the other, or
    /// when `follower` follows [`MAX_FOLLOWINGS`] accounts already.
    pub async fn follow(&self, follower: UserId, followee: UserId) -> Result<Relate, DbError> {
        let mut tx = self.pool.begin().await?;
        lock_pair(&mut tx, follower, followee).await?;
        if !lock_account(&mut tx, follower).await? {
            return Err(DbError::Invalid("the account is gone".into()));
        }
        let (blocked, following, count): (bool, bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM blocks WHERE (blocker_id = $1 AND blocked_id = $2)
                                                    OR (blocker_id = $2 AND blocked_id = $1)),
                    EXISTS (SELECT 1 FROM follows WHERE follower_id = $1 AND followee_id = $2),
                    (SELECT count(*) FROM follows WHERE follower_id = $1)",
        )
        .bind(follower)
        .bind(followee)
        .fetch_one(&mut *tx)
        .await?;
        if blocked {
            return Ok(Relate::Blocked);
        }
        if following {
            return Ok(Relate::Already);
        }
        if count >= MAX_FOLLOWINGS {
            return Ok(Relate::Full);
        }
        sqlx::query("INSERT INTO follows (follower_id, followee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(follower)
            .bind(followee)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Relate::Done)
    }

    /// Whether `follower` follows `followee`.
    pub async fn follows(&self, follower: UserId, followee: UserId) -> Result<bool, DbError> {
        let (found,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM follows WHERE follower_id = $1 AND followee_id = $2)")
                .bind(follower)
                .bind(followee)
                .fetch_one(&self.pool)
                .await?;
        Ok(found)
    }

    /// Whether either of two accounts blocks the other.
    pub async fn blocked_between(&self, a: UserId, b: UserId) -> Result<bool, DbError> {
        let (found,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM blocks WHERE (blocker_id = $1 AND blocked_id = $2)
                                                    OR (blocker_id = $2 AND blocked_id = $1))",
        )
        .bind(a)
        .bind(b)
        .fetch_one(&self.pool)
        .await?;
        Ok(found)
    }

    /// Who may send `user` direct messages.
    pub async fn messages_from(&self, user: UserId) -> Result<Option<MessagesFrom>, DbError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT messages_from FROM users WHERE id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(text,)| MessagesFrom::parse(&text).ok_or_else(|| DbError::Invalid(format!("messages_from {text:?}"))))
            .transpose()
    }

    /// Sets who may send `user` direct messages.
    pub async fn set_messages_from(&self, user: UserId, from: MessagesFrom) -> Result<(), DbError> {
        sqlx::query("UPDATE users SET messages_from = $2 WHERE id = $1")
            .bind(user)
            .bind(from.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `follower` stops following `followee` (idempotent).
    pub async fn unfollow(&self, follower: UserId, followee: UserId) -> Result<(), DbError> {
        sqlx::query("DELETE FROM follows WHERE follower_id = $1 AND followee_id = $2")
            .bind(follower)
            .bind(followee)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `blocker` blocks `blocked` (idempotent), ending the follows between them both ways.
    pub async fn block(&self, blocker: UserId, blocked: UserId) -> Result<Relate, DbError> {
        let mut tx = self.pool.begin().await?;
        lock_pair(&mut tx, blocker, blocked).await?;
        if !lock_account(&mut tx, blocker).await? {
            return Err(DbError::Invalid("the account is gone".into()));
        }
        let (exists, count): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM blocks WHERE blocker_id = $1 AND blocked_id = $2),
                    (SELECT count(*) FROM blocks WHERE blocker_id = $1)",
        )
        .bind(blocker)
        .bind(blocked)
        .fetch_one(&mut *tx)
        .await?;
        if !exists {
            if count >= MAX_BLOCKS {
                return Ok(Relate::Full);
            }
            sqlx::query("INSERT INTO blocks (blocker_id, blocked_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(blocker)
                .bind(blocked)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "DELETE FROM follows WHERE (follower_id = $1 AND followee_id = $2) OR (follower_id = $2 AND followee_id = $1)",
        )
        .bind(blocker)
        .bind(blocked)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Relate::Done)
    }

    /// `blocker` no longer blocks `blocked` (idempotent). Follows ended by the block stay ended.
    pub async fn unblock(&self, blocker: UserId, blocked: UserId) -> Result<(), DbError> {
        sqlx::query("DELETE FROM blocks WHERE blocker_id = $1 AND blocked_id = $2")
            .bind(blocker)
            .bind(blocked)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether `blocker` blocks `blocked`.
    pub async fn blocks(&self, blocker: UserId, blocked: UserId) -> Result<bool, DbError> {
        let (found,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM blocks WHERE blocker_id = $1 AND blocked_id = $2)")
                .bind(blocker)
                .bind(blocked)
                .fetch_one(&self.pool)
                .await?;
        Ok(found)
    }

    /// Every account that blocks `id` or that `id` blocks.
    pub async fn blocked_either_way(&self, id: UserId) -> Result<Vec<UserId>, DbError> {
        let rows: Vec<(UserId,)> = sqlx::query_as(
            "SELECT blocked_id FROM blocks WHERE blocker_id = $1
             UNION SELECT blocker_id FROM blocks WHERE blocked_id = $1",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The accounts `id` follows (at most [`MAX_FOLLOWINGS`]).
    pub async fn followee_ids(&self, id: UserId) -> Result<Vec<UserId>, DbError> {
        let rows: Vec<(UserId,)> = sqlx::query_as("SELECT followee_id FROM follows WHERE follower_id = $1 LIMIT $2")
            .bind(id)
            .bind(MAX_FOLLOWINGS)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// A page of the accounts related to `id`: its followers, followings or blocks.
    pub async fn related(
        &self,
        id: UserId,
        relation: Relation,
        after: Option<Keyset>,
        limit: i64,
    ) -> Result<Listed<Related>, DbError> {
        let limit = limit.clamp(1, 100);
        let (table, mine, theirs) = match relation {
            Relation::Followers => ("follows", "followee_id", "follower_id"),
            Relation::Followings => ("follows", "follower_id", "followee_id"),
            Relation::Blocks => ("blocks", "blocker_id", "blocked_id"),
        };
        let rows = sqlx::query_as::<_, Related>(sqlx::AssertSqlSafe(format!(
            "SELECT u.id, u.username, u.display_name, r.created_at AS since
             FROM {table} r JOIN users u ON u.id = r.{theirs}
             WHERE r.{mine} = $1
               AND ($2::timestamptz IS NULL OR (r.created_at, r.{theirs}) < ($2, $3))
             ORDER BY r.created_at DESC, r.{theirs} DESC
             LIMIT $4"
        )))
        .bind(id)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(listed(rows, limit, |row| (row.since, row.id.0)))
    }

    /// Likes or reposts `target` as `user` (`on`), or takes it back; `true` when it changed
    /// something (so a repost's activity is written once, and removed once).
    pub async fn set_mark(&self, mark: Mark, target: Target, user: UserId, on: bool) -> Result<bool, DbError> {
        let (table, column) = mark.table(target);
        let sql = if on {
            format!("INSERT INTO {table} (user_id, {column}) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        } else {
            format!("DELETE FROM {table} WHERE user_id = $1 AND {column} = $2")
        };
        match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user).bind(target.id()).execute(&self.pool).await {
            Ok(done) => Ok(done.rows_affected() == 1),
            // The object (or the account) was deleted meanwhile.
            Err(sqlx::Error::Database(err)) if err.is_foreign_key_violation() => {
                Err(DbError::Invalid("the object is gone".into()))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A page of what `user` liked or reposted that `viewer` may see, newest first.
    pub async fn marked(
        &self,
        mark: Mark,
        user: UserId,
        viewer: Viewer,
        after: Option<Keyset>,
        limit: i64,
    ) -> Result<Listed<Marked>, DbError> {
        let limit = limit.clamp(1, 100);
        let (tracks, playlists) = mark.tables();
        let rows: Vec<(bool, Uuid, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT m.is_track, m.object_id, m.created_at FROM (
                 SELECT true AS is_track, x.track_id AS object_id, x.created_at
                 FROM {tracks} x JOIN tracks t ON t.id = x.track_id
                 WHERE x.user_id = $3 AND {TRACK_VISIBLE}
                 UNION ALL
                 SELECT false, x.playlist_id, x.created_at
                 FROM {playlists} x JOIN playlists p ON p.id = x.playlist_id
                 WHERE x.user_id = $3 AND {PLAYLIST_VISIBLE}
             ) m
             WHERE ($4::timestamptz IS NULL OR (m.created_at, m.object_id) < ($4, $5))
             ORDER BY m.created_at DESC, m.object_id DESC
             LIMIT $6"
        )))
        .bind(viewer.id)
        .bind(viewer.admin)
        .bind(user)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .into_iter()
            .map(|(is_track, id, created_at)| Marked {
                target: if is_track { Target::Track(TrackId(id)) } else { Target::Playlist(PlaylistId(id)) },
                created_at,
            })
            .collect();
        Ok(listed(items, limit, |item| (item.created_at, item.target.id())))
    }

    /// The likes and reposts of some tracks, and `viewer`'s own.
    pub async fn track_stats(
        &self,
        ids: &[TrackId],
        viewer: Option<UserId>,
    ) -> Result<HashMap<TrackId, Stats>, DbError> {
        self.stats(ids.iter().map(|id| id.0).collect(), viewer, ("track_likes", "track_reposts", "track_id"))
            .await
            .map(|stats| stats.into_iter().map(|(id, stats)| (TrackId(id), stats)).collect())
    }

    /// The likes and reposts of some playlists, and `viewer`'s own.
    pub async fn playlist_stats(
        &self,
        ids: &[PlaylistId],
        viewer: Option<UserId>,
    ) -> Result<HashMap<PlaylistId, Stats>, DbError> {
        self.stats(ids.iter().map(|id| id.0).collect(), viewer, ("playlist_likes", "playlist_reposts", "playlist_id"))
            .await
            .map(|stats| stats.into_iter().map(|(id, stats)| (PlaylistId(id), stats)).collect())
    }

    async fn stats(
        &self,
        ids: Vec<Uuid>,
        viewer: Option<UserId>,
        (likes, reposts, column): (&str, &str, &str),
    ) -> Result<HashMap<Uuid, Stats>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(Uuid, i64, i64, bool, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT x.id,
                 (SELECT count(*) FROM {likes} l WHERE l.{column} = x.id),
                 (SELECT count(*) FROM {reposts} r WHERE r.{column} = x.id),
                 EXISTS (SELECT 1 FROM {likes} l WHERE l.{column} = x.id AND l.user_id = $2),
                 EXISTS (SELECT 1 FROM {reposts} r WHERE r.{column} = x.id AND r.user_id = $2)
             FROM unnest($1::uuid[]) AS x(id)"
        )))
        .bind(&ids)
        .bind(viewer)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, likes, reposts, liked, reposted)| (id, Stats { likes, reposts, liked, reposted }))
            .collect())
    }

    /// Creates a playlist with its tracks (each one the owner may see).
    pub async fn create_playlist(&self, new: &NewPlaylist) -> Result<Result<PlaylistId, PlaylistRefusal>, DbError> {
        let mut tx = self.pool.begin().await?;
        if !lock_account(&mut tx, new.owner).await? {
            return Err(DbError::Invalid("the account is gone".into()));
        }
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM playlists WHERE owner_id = $1")
            .bind(new.owner)
            .fetch_one(&mut *tx)
            .await?;
        if count >= MAX_PLAYLISTS {
            return Ok(Err(PlaylistRefusal::Full));
        }
        let id = PlaylistId::new();
        sqlx::query("INSERT INTO playlists (id, owner_id, title, description, visibility) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(new.owner)
            .bind(&new.title)
            .bind(&new.description)
            .bind(new.visibility.as_str())
            .execute(&mut *tx)
            .await?;
        if let Err(refusal) = write_tracks(&mut tx, id, new.owner, &new.tracks).await? {
            return Ok(Err(refusal));
        }
        tx.commit().await?;
        Ok(Ok(id))
    }

    /// Replaces a playlist's tracks, in order (each one the owner may see).
    pub async fn set_playlist_tracks(
        &self,
        id: PlaylistId,
        tracks: &[TrackId],
    ) -> Result<Result<(), PlaylistRefusal>, DbError> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<(UserId,)> = sqlx::query_as("SELECT owner_id FROM playlists WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((owner,)) = owner else {
            return Ok(Err(PlaylistRefusal::Gone));
        };
        sqlx::query("DELETE FROM playlist_tracks WHERE playlist_id = $1").bind(id).execute(&mut *tx).await?;
        if let Err(refusal) = write_tracks(&mut tx, id, owner, tracks).await? {
            return Ok(Err(refusal));
        }
        sqlx::query("UPDATE playlists SET updated_at = clock_timestamp() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Applies a playlist edit; `false` when the playlist is gone.
    pub async fn update_playlist(&self, id: PlaylistId, patch: &PlaylistPatch) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE playlists SET title = coalesce($2, title), description = coalesce($3, description),
                 visibility = coalesce($4, visibility), updated_at = clock_timestamp()
             WHERE id = $1",
        )
        .bind(id)
        .bind(&patch.title)
        .bind(&patch.description)
        .bind(patch.visibility.map(Visibility::as_str))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a playlist; `false` when it was gone.
    pub async fn delete_playlist(&self, id: PlaylistId) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM playlists WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// One playlist as `viewer` sees it, whether or not they may (the caller decides).
    pub async fn playlist(&self, id: PlaylistId, viewer: Viewer) -> Result<Option<PlaylistRow>, DbError> {
        Ok(sqlx::query_as::<_, PlaylistRow>(sqlx::AssertSqlSafe(format!("{PLAYLIST_SELECT} WHERE p.id = $3")))
            .bind(viewer.id)
            .bind(viewer.admin)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The playlists among `ids` that `viewer` may see.
    pub async fn visible_playlists(&self, ids: &[PlaylistId], viewer: Viewer) -> Result<Vec<PlaylistRow>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        Ok(sqlx::query_as::<_, PlaylistRow>(sqlx::AssertSqlSafe(format!(
            "{PLAYLIST_SELECT} WHERE p.id = ANY($3) AND {PLAYLIST_VISIBLE}"
        )))
        .bind(viewer.id)
        .bind(viewer.admin)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A page of `owner`'s playlists that `viewer` may see, newest first.
    pub async fn user_playlists(
        &self,
        owner: UserId,
        viewer: Viewer,
        after: Option<Keyset>,
        limit: i64,
    ) -> Result<Listed<PlaylistRow>, DbError> {
        let limit = limit.clamp(1, 100);
        let rows = sqlx::query_as::<_, PlaylistRow>(sqlx::AssertSqlSafe(format!(
            "{PLAYLIST_SELECT}
             WHERE p.owner_id = $3 AND {PLAYLIST_VISIBLE}
               AND ($4::timestamptz IS NULL OR (p.created_at, p.id) < ($4, $5))
             ORDER BY p.created_at DESC, p.id DESC
             LIMIT $6"
        )))
        .bind(viewer.id)
        .bind(viewer.admin)
        .bind(owner)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(listed(rows, limit, |row| (row.created_at, row.id.0)))
    }

    /// The tracks of a playlist that `viewer` may see, in order.
    pub async fn playlist_track_ids(&self, id: PlaylistId, viewer: Viewer) -> Result<Vec<TrackId>, DbError> {
        let rows: Vec<(TrackId,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT pt.track_id FROM playlist_tracks pt JOIN tracks t ON t.id = pt.track_id
             WHERE pt.playlist_id = $3 AND {TRACK_VISIBLE}
             ORDER BY pt.position"
        )))
        .bind(viewer.id)
        .bind(viewer.admin)
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The tracks `viewer` may see in each of some playlists, in order (one query).
    pub async fn playlists_track_ids(
        &self,
        ids: &[PlaylistId],
        viewer: Viewer,
    ) -> Result<HashMap<PlaylistId, Vec<TrackId>>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows: Vec<(PlaylistId, TrackId)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT pt.playlist_id, pt.track_id FROM playlist_tracks pt JOIN tracks t ON t.id = pt.track_id
             WHERE pt.playlist_id = ANY($3) AND {TRACK_VISIBLE}
             ORDER BY pt.playlist_id, pt.position"
        )))
        .bind(viewer.id)
        .bind(viewer.admin)
        .bind(&keys)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<PlaylistId, Vec<TrackId>> = HashMap::new();
        for (playlist, track) in rows {
            found.entry(playlist).or_default().push(track);
        }
        Ok(found)
    }

    /// Claims the `track` activity of a track that is ready and public and has none yet:
    /// its owner when this call claimed it.
    pub async fn claim_track_announcement(&self, id: TrackId) -> Result<Option<UserId>, DbError> {
        let row: Option<(UserId,)> = sqlx::query_as(
            "UPDATE tracks SET announced_at = clock_timestamp()
             WHERE id = $1 AND announced_at IS NULL AND visibility = 'public' AND ready_revision IS NOT NULL
             RETURNING owner_id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(owner,)| owner))
    }

    /// Claims the `playlist` activity of a public playlist that has none yet.
    pub async fn claim_playlist_announcement(&self, id: PlaylistId) -> Result<Option<UserId>, DbError> {
        let row: Option<(UserId,)> = sqlx::query_as(
            "UPDATE playlists SET announced_at = clock_timestamp()
             WHERE id = $1 AND announced_at IS NULL AND visibility = 'public'
             RETURNING owner_id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(owner,)| owner))
    }

    /// Gives back a claim whose activity could not be written, so a later change retries it.
    pub async fn release_announcement(&self, target: Target) -> Result<(), DbError> {
        let sql = match target {
            Target::Track(_) => "UPDATE tracks SET announced_at = NULL WHERE id = $1",
            Target::Playlist(_) => "UPDATE playlists SET announced_at = NULL WHERE id = $1",
        };
        sqlx::query(sql).bind(target.id()).execute(&self.pool).await?;
        Ok(())
    }

    /// Writes the activity of a track that is now ready and public (`track`), or of a playlist
    /// that is now public (`playlist`), unless it has one: at most one per object, however
    /// often it becomes so and wherever that is noticed (a worker finishing, an owner's edit).
    /// `true` when this call wrote it. When the document store refuses, the claim is given
    /// back, so the next change tries again.
    pub async fn announce(
        &self,
        documents: &dyn crate::documents::Documents,
        target: Target,
    ) -> Result<bool, AnnounceError> {
        use crate::documents::{ActivityKind, ActivityObject, NewActivity};
        let (claimed, kind, object) = match target {
            Target::Track(id) => {
                (self.claim_track_announcement(id).await?, ActivityKind::Track, ActivityObject::Track(id))
            }
            Target::Playlist(id) => {
                (self.claim_playlist_announcement(id).await?, ActivityKind::Playlist, ActivityObject::Playlist(id))
            }
        };
        let Some(actor) = claimed else {
            return Ok(false);
        };
        let written = documents.insert_activity(NewActivity { kind, actor, object, created_at: Utc::now() }).await;
        if let Err(err) = written {
            if let Err(release) = self.release_announcement(target).await {
                tracing::warn!(error = %release, "could not give back an activity's claim");
            }
            return Err(err.into());
        }
        Ok(true)
    }

    /// The tracks and playlists an account owns now.
    pub async fn owned(&self, user: UserId) -> Result<DeletedAccount, DbError> {
        let tracks: Vec<(TrackId,)> =
            sqlx::query_as("SELECT id FROM tracks WHERE owner_id = $1").bind(user).fetch_all(&self.pool).await?;
        let playlists: Vec<(PlaylistId,)> =
            sqlx::query_as("SELECT id FROM playlists WHERE owner_id = $1").bind(user).fetch_all(&self.pool).await?;
        Ok(DeletedAccount {
            tracks: tracks.into_iter().map(|(id,)| id).collect(),
            playlists: playlists.into_iter().map(|(id,)| id).collect(),
        })
    }

    /// Deletes an account and every row of it (its tracks, playlists, follows, blocks, likes,
    /// reposts and sessions) in one transaction; returns the tracks and playlists that went,
    /// whose objects and documents the caller removes. `None` when the account was gone.
    pub async fn delete_account(&self, user: UserId) -> Result<Option<DeletedAccount>, DbError> {
        let mut tx = self.pool.begin().await?;
        if !lock_account(&mut tx, user).await? {
            return Ok(None);
        }
        let tracks: Vec<(TrackId,)> = sqlx::query_as("DELETE FROM tracks WHERE owner_id = $1 RETURNING id")
            .bind(user)
            .fetch_all(&mut *tx)
            .await?;
        let playlists: Vec<(PlaylistId,)> = sqlx::query_as("DELETE FROM playlists WHERE owner_id = $1 RETURNING id")
            .bind(user)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1").bind(user).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(DeletedAccount {
            tracks: tracks.into_iter().map(|(id,)| id).collect(),
            playlists: playlists.into_iter().map(|(id,)| id).collect(),
        }))
    }
}

/// Who may send an account direct messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagesFrom {
    Everyone,
    /// Only the accounts it follows.
    Following,
}

impl MessagesFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            MessagesFrom::Everyone => "everyone",
            MessagesFrom::Following => "following",
        }
    }

    pub fn parse(text: &str) -> Option<MessagesFrom> {
        match text {
            "everyone" => Some(MessagesFrom::Everyone),
            "following" => Some(MessagesFrom::Following),
            _ => None,
        }
    }
}

/// Why [`PgSocial::announce`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Documents(#[from] crate::documents::DocumentsError),
}

/// Which accounts [`PgSocial::related`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Who follows the account.
    Followers,
    /// Whom the account follows.
    Followings,
    /// Whom the account blocks.
    Blocks,
}

/// Writes a playlist's tracks in order, after checking the owner may see each.
async fn write_tracks(
    tx: &mut sqlx::PgConnection,
    playlist: PlaylistId,
    owner: UserId,
    tracks: &[TrackId],
) -> Result<Result<(), PlaylistRefusal>, DbError> {
    if tracks.is_empty() {
        return Ok(Ok(()));
    }
    let ids: Vec<Uuid> = tracks.iter().map(|id| id.0).collect();
    // The owner's own tracks in any state, others' public and ready.
    let seen: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT t.id FROM tracks t WHERE t.id = ANY($1)
           AND (t.owner_id = $2 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))",
    )
    .bind(&ids)
    .bind(owner)
    .fetch_all(&mut *tx)
    .await?;
    let seen: std::collections::HashSet<Uuid> = seen.into_iter().map(|(id,)| id).collect();
    if let Some(unknown) = tracks.iter().find(|id| !seen.contains(&id.0)) {
        return Ok(Err(PlaylistRefusal::UnknownTrack(*unknown)));
    }
    sqlx::query(
        "INSERT INTO playlist_tracks (playlist_id, position, track_id)
         SELECT $1, (x.n - 1)::integer, x.id FROM unnest($2::uuid[]) WITH ORDINALITY AS x(id, n)",
    )
    .bind(playlist)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    Ok(Ok(()))
}
