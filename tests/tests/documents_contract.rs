//! The `Documents` contract: every case runs against `PgDocuments` (a PostgreSQL database of
//! its own, migrated) and against `MongoDocuments` (a MongoDB database of its own on the test
//! server, indexes created by `migrate`, dropped afterwards). Then one test reads MongoDB
//! with the driver to show the documents are really there.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Duration, Utc};
use mongodb::bson::{Bson, Document, doc};
use waveline_shared::documents::{
    Activity, ActivityKind, ActivityObject, Comment, CommentOrder, CommentQuery, ConversationPage, Documents,
    DocumentsError, MAX_FEED_ACTORS, MAX_PAGE, MongoDocuments, NewActivity, NewComment, NewMessage, NewNotification,
    NotificationKind, PgDocuments, Subject, conversation_between,
};
use waveline_shared::domain::{CommentId, PlaylistId, TrackId, UserId};
use waveline_tests::{TestDb, init_logging, test_documents_url};

struct Backend {
    docs: Arc<dyn Documents>,
    mongo: Option<MongoDocuments>,
    _db: Option<TestDb>,
}

impl Backend {
    async fn postgres() -> Result<Backend> {
        let db = TestDb::new().await?;
        Ok(Backend { docs: Arc::new(PgDocuments::new(db.pool.clone())), mongo: None, _db: Some(db) })
    }

    async fn mongodb() -> Result<Backend> {
        let (url, name) = test_documents_url();
        let mongo = MongoDocuments::connect(&url, &name).await?;
        mongo.migrate().await.with_context(|| format!("MongoDB is not answering at {url}; run scripts/setup.sh"))?;
        // Idempotent: a second run finds the indexes and changes nothing.
        mongo.migrate().await?;
        Ok(Backend { docs: Arc::new(mongo.clone()), mongo: Some(mongo), _db: None })
    }

    async fn cleanup(self) -> Result<()> {
        if let Some(mongo) = self.mongo {
            mongo.drop_database().await?;
        }
        Ok(())
    }
}

/// A fixed moment, so that tests can make equal `created_at` on purpose.
fn moment(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap_or_default()
}

fn new_comment(track: TrackId, user: UserId, timestamp_ms: i64, at: DateTime<Utc>) -> NewComment {
    NewComment {
        track_id: track,
        user_id: user,
        body: format!("at {timestamp_ms} ms: ça sonne 🎧"),
        timestamp_ms,
        reply_to: None,
        created_at: at,
    }
}

async fn comment(b: &Backend, track: TrackId, user: UserId, timestamp_ms: i64, at: DateTime<Utc>) -> Result<Comment> {
    Ok(b.docs.insert_comment(new_comment(track, user, timestamp_ms, at)).await?)
}

async fn reply(b: &Backend, to: &Comment, user: UserId, at: DateTime<Utc>) -> Result<Comment> {
    let mut new = new_comment(to.track_id, user, to.timestamp_ms, at);
    new.reply_to = Some(to.id);
    Ok(b.docs.insert_comment(new).await?)
}

fn query(track: TrackId, order: CommentOrder, limit: usize) -> CommentQuery {
    CommentQuery { track_id: track, order, from_ms: None, to_ms: None, cursor: None, limit }
}

/// Every page of a query, `limit` at a time; fails on a loop.
async fn all_pages(b: &Backend, mut q: CommentQuery) -> Result<(Vec<Comment>, usize)> {
    let (mut all, mut pages) = (Vec::new(), 0);
    loop {
        let page = b.docs.comments(&q).await?;
        pages += 1;
        ensure!(page.comments.len() <= q.limit.clamp(1, MAX_PAGE), "a page longer than asked");
        all.extend(page.comments);
        match page.next_cursor {
            Some(cursor) => q.cursor = Some(cursor),
            None => return Ok((all, pages)),
        }
        ensure!(pages < 1000, "the cursor never ends");
    }
}

fn ids(comments: &[Comment]) -> Vec<CommentId> {
    comments.iter().map(|c| c.id).collect()
}

fn activity(kind: ActivityKind, actor: UserId, object: ActivityObject, at: DateTime<Utc>) -> NewActivity {
    NewActivity { kind, actor, object, created_at: at }
}

async fn whole_feed(b: &Backend, actors: &[UserId], limit: usize) -> Result<Vec<Activity>> {
    let (mut all, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = b.docs.feed(actors, cursor.as_deref(), limit).await?;
        ensure!(page.activities.len() <= limit, "a page longer than asked");
        all.extend(page.activities);
        pages += 1;
        ensure!(pages < 1000, "the cursor never ends");
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(all),
        }
    }
}

fn code(result: Result<impl std::fmt::Debug, DocumentsError>) -> Result<&'static str> {
    match result {
        Ok(value) => bail!("expected an error, got {value:?}"),
        Err(err) => Ok(err.code()),
    }
}

// ---- comments ----

async fn a_comment_reads_back_as_written(b: &Backend) -> Result<()> {
    let (track, user) = (TrackId::new(), UserId::new());
    let written = comment(b, track, user, 61_500, Utc::now()).await?;
    ensure!(written.reply_to.is_none() && written.track_id == track && written.user_id == user);
    // The id carries the creation millisecond, and the time is kept to the millisecond.
    let (secs, nanos) = written.id.0.get_timestamp().context("a UUIDv7")?.to_unix();
    ensure!(secs as i64 * 1000 + i64::from(nanos / 1_000_000) == written.created_at.timestamp_millis());
    ensure!(written.created_at.timestamp_subsec_nanos() % 1_000_000 == 0, "{:?}", written.created_at);
    let read = b.docs.comment(written.id).await?.context("the comment")?;
    ensure!(read == written, "{read:?} != {written:?}");
    ensure!(b.docs.comment(CommentId::new()).await?.is_none());
    Ok(())
}

async fn timestamp_order_pages_through_ties_without_skipping_or_repeating(b: &Backend) -> Result<()> {
    let (track, other) = (TrackId::new(), TrackId::new());
    let user = UserId::new();
    let mut written = Vec::new();
    // Seven at the same timestamp, around them a few others; some in the same millisecond.
    for (i, ts) in [1000, 1000, 0, 1000, 2500, 1000, 1000, 1000, 1000, 90_000, 0].into_iter().enumerate() {
        written.push(comment(b, track, user, ts, moment(i as i64 / 3)).await?);
    }
    comment(b, other, user, 1000, moment(0)).await?;
    let mut want = written.clone();
    want.sort_by_key(|c| (c.timestamp_ms, c.id));
    for limit in [1, 2, 3, 100] {
        let (got, pages) = all_pages(b, query(track, CommentOrder::Timestamp, limit)).await?;
        ensure!(ids(&got) == ids(&want), "limit {limit}: {:?} != {:?}", ids(&got), ids(&want));
        ensure!(pages == written.len().div_ceil(limit).max(1), "limit {limit}: {pages} pages");
    }
    ensure!(b.docs.count_comments(track).await? == written.len() as u64);
    ensure!(b.docs.count_comments(other).await? == 1);
    ensure!(b.docs.count_comments(TrackId::new()).await? == 0);
    Ok(())
}

async fn newest_first_is_stable_under_equal_times_and_new_comments(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let user = UserId::new();
    let mut written = Vec::new();
    for i in 0..9 {
        // Three per millisecond.
        written.push(comment(b, track, user, i * 100, moment(i / 3)).await?);
    }
    let mut want = written.clone();
    want.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.id)));
    let first = b.docs.comments(&query(track, CommentOrder::Newest, 4)).await?;
    ensure!(ids(&first.comments) == ids(&want[..4]), "{:?}", ids(&first.comments));
    // A comment written while someone pages through is not on the later pages (it is newer
    // than the cursor), and nothing already listed comes back.
    comment(b, track, user, 5, moment(1)).await?;
    let mut q = query(track, CommentOrder::Newest, 4);
    q.cursor = first.next_cursor.clone();
    let (rest, _) = all_pages(b, q).await?;
    let mut seen = ids(&first.comments);
    seen.extend(ids(&rest));
    let late = rest.iter().filter(|c| !written.iter().any(|w| w.id == c.id)).count();
    // The late comment sits in millisecond 1, which the cursor (in millisecond 2) precedes:
    // it is listed once if its random id falls after the cursor's, as any order must allow.
    ensure!(late <= 1, "{late}");
    let unique: BTreeSet<_> = seen.iter().collect();
    ensure!(unique.len() == seen.len(), "an item repeated across pages: {seen:?}");
    for w in &written {
        ensure!(seen.contains(&w.id), "{} skipped", w.id);
    }
    ensure!(seen.windows(2).all(|pair| pair[0] > pair[1]), "not newest first: {seen:?}");
    Ok(())
}

async fn a_time_window_bounds_both_orders_inclusively(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let user = UserId::new();
    let mut written = Vec::new();
    for (i, ts) in [0, 999, 1000, 1500, 1500, 2000, 2001, 10_000].into_iter().enumerate() {
        written.push(comment(b, track, user, ts, moment(i as i64)).await?);
    }
    let inside: Vec<&Comment> = written.iter().filter(|c| (1000..=2000).contains(&c.timestamp_ms)).collect();
    for order in [CommentOrder::Timestamp, CommentOrder::Newest] {
        let mut q = query(track, order, 2);
        (q.from_ms, q.to_ms) = (Some(1000), Some(2000));
        let (got, pages) = all_pages(b, q).await?;
        ensure!(got.len() == inside.len() && pages == 2, "{order:?}: {} in {pages} pages", got.len());
        ensure!(got.iter().all(|c| (1000..=2000).contains(&c.timestamp_ms)), "{order:?}: {got:?}");
    }
    let mut open_ended = query(track, CommentOrder::Timestamp, 100);
    open_ended.from_ms = Some(2000);
    ensure!(b.docs.comments(&open_ended).await?.comments.len() == 3);
    open_ended.from_ms = None;
    open_ended.to_ms = Some(999);
    ensure!(b.docs.comments(&open_ended).await?.comments.len() == 2);
    open_ended.from_ms = Some(3000);
    let empty = b.docs.comments(&open_ended).await?;
    ensure!(empty.comments.is_empty() && empty.next_cursor.is_none());
    Ok(())
}

async fn replies_attach_to_their_root_on_the_same_track(b: &Backend) -> Result<()> {
    let (track, other) = (TrackId::new(), TrackId::new());
    let (alice, bob) = (UserId::new(), UserId::new());
    let root = comment(b, track, alice, 3000, moment(0)).await?;
    let first = reply(b, &root, bob, moment(1)).await?;
    ensure!(first.reply_to == Some(root.id));
    // A reply to a reply is stored against the root: replies are one level deep.
    let second = reply(b, &first, alice, moment(2)).await?;
    ensure!(second.reply_to == Some(root.id), "{second:?}");
    ensure!(b.docs.comment(second.id).await?.context("stored")?.reply_to == Some(root.id));
    // The target must be a comment of the same track.
    let mut elsewhere = new_comment(other, bob, 10, moment(3));
    elsewhere.reply_to = Some(root.id);
    ensure!(code(b.docs.insert_comment(elsewhere).await)? == "reply_target_not_found");
    let mut nowhere = new_comment(track, bob, 10, moment(3));
    nowhere.reply_to = Some(CommentId::new());
    ensure!(code(b.docs.insert_comment(nowhere).await)? == "reply_target_not_found");
    ensure!(b.docs.count_comments(track).await? == 3 && b.docs.count_comments(other).await? == 0);
    Ok(())
}

async fn deleting_a_comment_takes_its_replies_and_nothing_else(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let (alice, bob) = (UserId::new(), UserId::new());
    let root = comment(b, track, alice, 0, moment(0)).await?;
    let kept = comment(b, track, alice, 5, moment(1)).await?;
    let kept_reply = reply(b, &kept, bob, moment(2)).await?;
    let mut replies = Vec::new();
    for i in 0..3 {
        replies.push(reply(b, &root, bob, moment(3 + i)).await?);
    }
    // A reply alone goes alone.
    ensure!(b.docs.delete_comment(replies[0].id).await? == 1);
    ensure!(b.docs.count_comments(track).await? == 5);
    // A root goes with the replies left.
    ensure!(b.docs.delete_comment(root.id).await? == 3);
    ensure!(b.docs.delete_comment(root.id).await? == 0, "deleting twice removes nothing more");
    let (left, _) = all_pages(b, query(track, CommentOrder::Timestamp, 10)).await?;
    ensure!(ids(&left) == [kept.id, kept_reply.id], "{left:?}");
    ensure!(b.docs.count_comments(track).await? == 2);
    Ok(())
}

async fn deleting_a_tracks_comments_leaves_other_tracks_alone(b: &Backend) -> Result<()> {
    let (track, other) = (TrackId::new(), TrackId::new());
    let user = UserId::new();
    for i in 0..4 {
        let root = comment(b, track, user, i, moment(i)).await?;
        reply(b, &root, user, moment(i)).await?;
    }
    let survivor = comment(b, other, user, 0, moment(0)).await?;
    ensure!(b.docs.delete_track_comments(track).await? == 8);
    ensure!(b.docs.count_comments(track).await? == 0);
    ensure!(b.docs.comments(&query(track, CommentOrder::Newest, 10)).await?.comments.is_empty());
    ensure!(b.docs.comment(survivor.id).await?.is_some() && b.docs.count_comments(other).await? == 1);
    ensure!(b.docs.delete_track_comments(track).await? == 0);
    Ok(())
}

async fn deleting_an_account_removes_its_comments_replies_to_them_and_its_activities(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let (gone, stays) = (UserId::new(), UserId::new());
    let gone_root = comment(b, track, gone, 0, moment(0)).await?;
    let reply_to_gone = reply(b, &gone_root, stays, moment(1)).await?;
    let stays_root = comment(b, track, stays, 10, moment(2)).await?;
    let gone_reply = reply(b, &stays_root, gone, moment(3)).await?;
    let stays_reply = reply(b, &stays_root, stays, moment(4)).await?;
    let object = ActivityObject::Track(track);
    b.docs.insert_activity(activity(ActivityKind::Track, gone, object, moment(0))).await?;
    b.docs.insert_activity(activity(ActivityKind::TrackRepost, gone, object, moment(1))).await?;
    let kept = b.docs.insert_activity(activity(ActivityKind::TrackRepost, stays, object, moment(2))).await?;

    let removed = b.docs.delete_account(gone).await?;
    ensure!(removed.comments == 3 && removed.activities == 2, "{removed:?}");
    for id in [gone_root.id, reply_to_gone.id, gone_reply.id] {
        ensure!(b.docs.comment(id).await?.is_none(), "{id} survived");
    }
    let (left, _) = all_pages(b, query(track, CommentOrder::Timestamp, 10)).await?;
    ensure!(ids(&left) == [stays_root.id, stays_reply.id], "{left:?}");
    ensure!(b.docs.actor_activities(gone, None, 10).await?.activities.is_empty());
    ensure!(b.docs.actor_activities(stays, None, 10).await?.activities == [kept]);
    ensure!(b.docs.delete_account(gone).await? == Default::default());
    Ok(())
}

async fn malformed_and_foreign_cursors_are_refused_with_a_code(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let user = UserId::new();
    for i in 0..3 {
        comment(b, track, user, i, moment(i)).await?;
        b.docs.insert_activity(activity(ActivityKind::Track, user, ActivityObject::Track(track), moment(i))).await?;
    }
    let by_time = b.docs.comments(&query(track, CommentOrder::Timestamp, 1)).await?.next_cursor.context("cursor")?;
    let newest = b.docs.comments(&query(track, CommentOrder::Newest, 1)).await?.next_cursor.context("cursor")?;
    let feed = b.docs.feed(&[user], None, 1).await?.next_cursor.context("cursor")?;
    let mut bad: Vec<String> =
        ["", "garbage", "t", "t1.", "t1.zz", "t1.0000", "t-.0", "t1e3.0", "\u{0}", "t١.0"].map(String::from).to_vec();
    bad.push(format!("{by_time}0"));
    bad.push(by_time.replace('.', ","));
    bad.push(format!("t99999999999999999999{}", &by_time[by_time.find('.').unwrap_or(0)..]));
    for text in &bad {
        let mut q = query(track, CommentOrder::Timestamp, 10);
        q.cursor = Some(text.clone());
        ensure!(code(b.docs.comments(&q).await)? == "invalid_cursor", "{text:?}");
        ensure!(code(b.docs.feed(&[user], Some(text), 10).await)? == "invalid_cursor", "{text:?}");
    }
    // A cursor of one list is refused by another.
    let mut q = query(track, CommentOrder::Timestamp, 10);
    for foreign in [&newest, &feed] {
        q.cursor = Some(foreign.clone());
        ensure!(code(b.docs.comments(&q).await)? == "invalid_cursor", "{foreign}");
    }
    ensure!(code(b.docs.feed(&[user], Some(&by_time), 10).await)? == "invalid_cursor");
    // A newest-first cursor whose time is out of range is refused, not a server error.
    let mut q = query(track, CommentOrder::Newest, 10);
    q.cursor = Some(format!("n{}{}", i64::MAX, &newest[newest.find('.').unwrap_or(0)..]));
    ensure!(code(b.docs.comments(&q).await)? == "invalid_cursor");
    Ok(())
}

async fn limits_are_bounded(b: &Backend) -> Result<()> {
    let track = TrackId::new();
    let user = UserId::new();
    for i in 0..(MAX_PAGE as i64 + 3) {
        comment(b, track, user, i, moment(i)).await?;
    }
    let huge = b.docs.comments(&query(track, CommentOrder::Timestamp, 1_000_000)).await?;
    ensure!(huge.comments.len() == MAX_PAGE && huge.next_cursor.is_some(), "{}", huge.comments.len());
    let zero = b.docs.comments(&query(track, CommentOrder::Newest, 0)).await?;
    ensure!(zero.comments.len() == 1 && zero.next_cursor.is_some());
    ensure!(b.docs.count_comments(track).await? == MAX_PAGE as u64 + 3);
    let too_many: Vec<UserId> = (0..=MAX_FEED_ACTORS).map(|_| UserId::new()).collect();
    ensure!(code(b.docs.feed(&too_many, None, 10).await)? == "invalid_field");
    ensure!(b.docs.feed(&too_many[..MAX_FEED_ACTORS], None, 10).await?.activities.is_empty());
    Ok(())
}

async fn bad_fields_are_refused_with_the_field(b: &Backend) -> Result<()> {
    let (track, user) = (TrackId::new(), UserId::new());
    let mut new = new_comment(track, user, 0, moment(0));
    for (body, ok) in [(String::new(), false), ("é".repeat(1000), true), ("x".repeat(1001), false)] {
        new.body = body;
        match b.docs.insert_comment(new.clone()).await {
            Ok(stored) => ensure!(ok && stored.body == new.body, "{} chars", new.body.chars().count()),
            Err(DocumentsError::Invalid { field: "body", .. }) => ensure!(!ok, "{} chars refused", new.body.len()),
            Err(other) => bail!("{other}"),
        }
    }
    new.body = "fine".into();
    new.timestamp_ms = -1;
    ensure!(matches!(b.docs.insert_comment(new).await, Err(DocumentsError::Invalid { field: "timestamp_ms", .. })));
    let mismatched = activity(ActivityKind::Playlist, user, ActivityObject::Track(track), moment(0));
    ensure!(matches!(b.docs.insert_activity(mismatched).await, Err(DocumentsError::Invalid { field: "object", .. })));
    ensure!(b.docs.count_comments(track).await? == 1);
    Ok(())
}

// ---- activities ----

async fn the_feed_merges_actors_newest_first_through_ties(b: &Backend) -> Result<()> {
    let actors: Vec<UserId> = (0..4).map(|_| UserId::new()).collect();
    let stranger = UserId::new();
    let mut written = Vec::new();
    for i in 0..24i64 {
        let actor = actors[(i % 4) as usize];
        let (kind, object) = match i % 3 {
            0 => (ActivityKind::Track, ActivityObject::Track(TrackId::new())),
            1 => (ActivityKind::PlaylistRepost, ActivityObject::Playlist(PlaylistId::new())),
            _ => (ActivityKind::TrackRepost, ActivityObject::Track(TrackId::new())),
        };
        // Four actors per millisecond: ties across actors.
        written.push(b.docs.insert_activity(activity(kind, actor, object, moment(i / 4))).await?);
        b.docs.insert_activity(activity(kind, stranger, object, moment(i / 4))).await?;
    }
    let followed = &actors[..3];
    let mut want: Vec<Activity> = written.iter().filter(|a| followed.contains(&a.actor)).cloned().collect();
    want.sort_by_key(|a| std::cmp::Reverse((a.created_at, a.id)));
    for limit in [1, 4, 5, 100] {
        let got = whole_feed(b, followed, limit).await?;
        ensure!(got == want, "limit {limit}: {} items, want {}", got.len(), want.len());
    }
    // The same actor named twice changes nothing; nobody followed is an empty page.
    let doubled: Vec<UserId> = followed.iter().chain(followed).copied().collect();
    ensure!(whole_feed(b, &doubled, 7).await? == want);
    let empty = b.docs.feed(&[], None, 10).await?;
    ensure!(empty.activities.is_empty() && empty.next_cursor.is_none());
    // One actor's stream.
    let own = b.docs.actor_activities(actors[3], None, 100).await?;
    ensure!(own.activities.len() == 6 && own.activities.iter().all(|a| a.actor == actors[3]));
    ensure!(own.activities.windows(2).all(|p| (p[0].created_at, p[0].id) > (p[1].created_at, p[1].id)));
    Ok(())
}

async fn activities_of_an_object_go_all_at_once_or_one_actors(b: &Backend) -> Result<()> {
    let (uploader, fan, other_fan) = (UserId::new(), UserId::new(), UserId::new());
    let (track, other_track) = (TrackId::new(), TrackId::new());
    let playlist = PlaylistId(track.0); // the same UUID as the track, another kind of object
    let t = ActivityObject::Track(track);
    b.docs.insert_activity(activity(ActivityKind::Track, uploader, t, moment(0))).await?;
    b.docs.insert_activity(activity(ActivityKind::TrackRepost, fan, t, moment(1))).await?;
    b.docs.insert_activity(activity(ActivityKind::TrackRepost, other_fan, t, moment(2))).await?;
    let unrelated = b
        .docs
        .insert_activity(activity(ActivityKind::Track, uploader, ActivityObject::Track(other_track), moment(3)))
        .await?;
    let list = b
        .docs
        .insert_activity(activity(ActivityKind::PlaylistRepost, fan, ActivityObject::Playlist(playlist), moment(4)))
        .await?;
    // A repost taken back: that actor's activity about the track only.
    ensure!(b.docs.delete_object_activities(t, Some(fan)).await? == 1);
    ensure!(b.docs.feed(&[fan], None, 10).await?.activities == std::slice::from_ref(&list));
    // The track deleted: every activity about it, and nothing about the playlist.
    ensure!(b.docs.delete_object_activities(t, None).await? == 2);
    let left = whole_feed(b, &[uploader, fan, other_fan], 10).await?;
    ensure!(left == [list, unrelated], "{left:?}");
    Ok(())
}

/// An account's newest activity deleted, the feed goes on from the one before it, on the first
/// page and below a cursor alike; with none left the account has nothing in the feed, until it
/// posts again.
async fn the_feed_survives_the_deletion_of_an_accounts_newest_activity(b: &Backend) -> Result<()> {
    let (writer, other) = (UserId::new(), UserId::new());
    let objects: Vec<ActivityObject> = (0..4).map(|_| ActivityObject::Track(TrackId::new())).collect();
    let mut written = Vec::new();
    for (n, object) in objects.iter().enumerate() {
        written.push(
            b.docs.insert_activity(activity(ActivityKind::Track, writer, *object, moment(100 + n as i64))).await?,
        );
    }
    let others = b.docs.insert_activity(activity(ActivityKind::Track, other, objects[0], moment(50))).await?;
    ensure!(b.docs.delete_object_activities(objects[3], Some(writer)).await? == 1);
    let first = b.docs.feed(&[writer], None, 1).await?;
    ensure!(first.activities == written[2..3], "{:?}", first.activities);
    let all = whole_feed(b, &[writer, other], 1).await?;
    ensure!(all == [written[2].clone(), written[1].clone(), written[0].clone(), others.clone()], "{all:?}");
    for object in &objects[..3] {
        ensure!(b.docs.delete_object_activities(*object, Some(writer)).await? == 1);
    }
    ensure!(b.docs.feed(&[writer], None, 10).await?.activities.is_empty());
    ensure!(whole_feed(b, &[writer, other], 1).await? == std::slice::from_ref(&others));
    let again = b.docs.insert_activity(activity(ActivityKind::Track, writer, objects[3], moment(99))).await?;
    ensure!(whole_feed(b, &[writer, other], 1).await? == [again, others]);
    Ok(())
}

async fn comments_are_counted_per_track_in_one_call(b: &Backend) -> Result<()> {
    let (busy, quiet, silent) = (TrackId::new(), TrackId::new(), TrackId::new());
    let user = UserId::new();
    for n in 0..5 {
        let root = comment(b, busy, user, n, moment(n)).await?;
        if n == 0 {
            reply(b, &root, user, moment(10)).await?;
        }
    }
    comment(b, quiet, user, 0, moment(20)).await?;
    let counts = b.docs.count_comments_of(&[busy, quiet, silent]).await?;
    ensure!(counts.get(&busy) == Some(&6) && counts.get(&quiet) == Some(&1), "{counts:?}");
    ensure!(counts.get(&silent).copied().unwrap_or(0) == 0, "{counts:?}");
    ensure!(b.docs.count_comments_of(&[]).await?.is_empty());
    let too_many: Vec<TrackId> = (0..=waveline_shared::documents::MAX_COUNTED_TRACKS).map(|_| TrackId::new()).collect();
    match b.docs.count_comments_of(&too_many).await {
        Err(DocumentsError::Invalid { field: "tracks", .. }) => Ok(()),
        other => bail!("{} tracks were counted: {other:?}", too_many.len()),
    }
}

async fn the_newest_activity_about_each_object_among_actors(b: &Backend) -> Result<()> {
    let (uploader, fan, stranger) = (UserId::new(), UserId::new(), UserId::new());
    let (track, quiet) = (TrackId::new(), TrackId::new());
    let playlist = PlaylistId(track.0); // the same UUID, another kind of object
    let t = ActivityObject::Track(track);
    let posted = b.docs.insert_activity(activity(ActivityKind::Track, uploader, t, moment(0))).await?;
    let reposted = b.docs.insert_activity(activity(ActivityKind::TrackRepost, fan, t, moment(5))).await?;
    b.docs.insert_activity(activity(ActivityKind::TrackRepost, stranger, t, moment(9))).await?;
    let listed = b
        .docs
        .insert_activity(activity(ActivityKind::Playlist, uploader, ActivityObject::Playlist(playlist), moment(1)))
        .await?;
    let objects = [t, ActivityObject::Playlist(playlist), ActivityObject::Track(quiet)];
    let newest = b.docs.newest_about(&objects, &[uploader, fan]).await?;
    ensure!(newest.get(&t) == Some(&reposted.id), "{newest:?}");
    ensure!(newest.get(&ActivityObject::Playlist(playlist)) == Some(&listed.id), "{newest:?}");
    ensure!(!newest.contains_key(&ActivityObject::Track(quiet)), "{newest:?}");
    let only_uploader = b.docs.newest_about(&[t], &[uploader]).await?;
    ensure!(only_uploader.get(&t) == Some(&posted.id), "{only_uploader:?}");
    ensure!(b.docs.newest_about(&[t], &[]).await?.is_empty());
    let too_many = vec![t; MAX_PAGE + 1];
    ensure!(matches!(
        b.docs.newest_about(&too_many, &[uploader]).await,
        Err(DocumentsError::Invalid { field: "objects", .. })
    ));
    Ok(())
}

fn message(sender: UserId, recipient: UserId, body: &str, client_id: &str, at: DateTime<Utc>) -> NewMessage {
    NewMessage { sender, recipient, body: body.to_owned(), client_id: client_id.to_owned(), created_at: at }
}

async fn messages_are_idempotent_by_client_id_and_listed_newest_first(b: &Backend) -> Result<()> {
    let (a, z) = (UserId::new(), UserId::new());
    let first = b.docs.send_message(message(a, z, "salut 👋", "c-1", moment(0))).await?;
    ensure!(first.new && first.message.conversation_id == conversation_between(z, a), "{first:?}");
    ensure!(first.message.body == "salut 👋" && first.message.created_at == moment(0), "{first:?}");
    let second = b.docs.send_message(message(z, a, "hi", "c-1", moment(1))).await?;
    ensure!(second.new, "the same client_id of another sender is another message");
    let third = b.docs.send_message(message(a, z, "again", "c-2", moment(2))).await?;
    // A retried send returns the first, unchanged.
    let retried = b.docs.send_message(message(a, z, "salut (edited)", "c-1", moment(3))).await?;
    ensure!(!retried.new && retried.message == first.message, "{retried:?}");
    let conversation = first.message.conversation_id;
    let members = b.docs.conversation_members(conversation).await?.context("members")?;
    ensure!(BTreeSet::from([members.0, members.1]) == BTreeSet::from([a, z]), "{members:?}");
    ensure!(b.docs.conversation_members(conversation_between(a, UserId::new())).await?.is_none());
    let page = b.docs.messages(conversation, None, 2).await?;
    ensure!(page.messages == [third.message.clone(), second.message.clone()], "{page:?}");
    let rest = b.docs.messages(conversation, page.next_cursor.as_deref(), 2).await?;
    ensure!(rest.messages == [first.message.clone()] && rest.next_cursor.is_none(), "{rest:?}");
    ensure!(matches!(b.docs.messages(conversation, Some("t1.zz"), 2).await, Err(DocumentsError::InvalidCursor)));
    for bad in [
        message(a, z, "", "c-9", moment(4)),
        message(a, z, "x", "not ok", moment(4)),
        message(a, a, "x", "c-9", moment(4)),
    ] {
        ensure!(matches!(b.docs.send_message(bad).await, Err(DocumentsError::Invalid { .. })));
    }
    Ok(())
}

async fn conversations_list_the_latest_first_with_exact_unread_counts(b: &Backend) -> Result<()> {
    let (a, friend, other) = (UserId::new(), UserId::new(), UserId::new());
    let m1 = b.docs.send_message(message(friend, a, "one", "f-1", moment(10))).await?.message;
    let m2 = b.docs.send_message(message(friend, a, "two", "f-2", moment(11))).await?.message;
    let m3 = b.docs.send_message(message(a, other, "three", "a-1", moment(12))).await?.message;
    let page = b.docs.conversations(a, None, 10).await?;
    let listed: Vec<_> = page.conversations.iter().map(|c| (c.other, c.last_message.id, c.unread_count)).collect();
    ensure!(listed == [(other, m3.id, 0), (friend, m2.id, 2)], "{listed:?}");
    let first = b.docs.conversations(a, None, 1).await?;
    ensure!(first.conversations.len() == 1 && first.next_cursor.is_some());
    let second = b.docs.conversations(a, first.next_cursor.as_deref(), 1).await?;
    ensure!(second.conversations[0].other == friend && second.next_cursor.is_none(), "{second:?}");
    // Reading moves forward only.
    let with_friend = m1.conversation_id;
    ensure!(b.docs.mark_conversation_read(with_friend, a, m1.id).await?);
    let unread = |page: ConversationPage| page.conversations.iter().find(|c| c.other == friend).map(|c| c.unread_count);
    ensure!(unread(b.docs.conversations(a, None, 10).await?) == Some(1));
    ensure!(b.docs.mark_conversation_read(with_friend, a, m2.id).await?);
    ensure!(b.docs.mark_conversation_read(with_friend, a, m1.id).await?);
    ensure!(unread(b.docs.conversations(a, None, 10).await?) == Some(0));
    ensure!(!b.docs.mark_conversation_read(with_friend, other, m2.id).await?, "not a member");
    let theirs = b.docs.conversations(other, None, 10).await?;
    ensure!(theirs.conversations.len() == 1 && theirs.conversations[0].unread_count == 1, "{theirs:?}");
    Ok(())
}

async fn notifications_keep_the_newest_and_count_the_unread(b: &Backend) -> Result<()> {
    let (user, actor) = (UserId::new(), UserId::new());
    let subjects = [
        Subject::Nothing,
        Subject::Track { id: TrackId::new() },
        Subject::Playlist { id: PlaylistId::new() },
        Subject::Comment { track: TrackId::new(), comment: CommentId::new() },
        Subject::Conversation {
            id: conversation_between(user, actor),
            message: waveline_shared::domain::MessageId::new(),
        },
    ];
    let mut stored = Vec::new();
    for (n, (kind, subject)) in NotificationKind::ALL.iter().zip(subjects.iter().cycle()).enumerate() {
        let new = NewNotification {
            user_id: user,
            kind: *kind,
            actor: (n % 2 == 0).then_some(actor),
            subject: *subject,
            created_at: moment(n as i64),
        };
        stored.push(b.docs.insert_notification(new).await?);
    }
    let page = b.docs.notifications(user, None, 100).await?;
    let mut newest_first = stored.clone();
    newest_first.reverse();
    ensure!(page.notifications == newest_first, "{page:?}");
    ensure!(page.unread_count == stored.len() as u64 && page.next_cursor.is_none());
    b.docs.mark_notifications_read(user, stored[5].id).await?;
    b.docs.mark_notifications_read(user, stored[1].id).await?; // never backwards
    let page = b.docs.notifications(user, None, 3).await?;
    ensure!(page.unread_count == 2 && page.notifications.len() == 3 && page.next_cursor.is_some(), "{page:?}");
    let rest = b.docs.notifications(user, page.next_cursor.as_deref(), 100).await?;
    ensure!(rest.notifications.len() == stored.len() - 3, "{rest:?}");
    ensure!(b.docs.notifications(UserId::new(), None, 10).await?.unread_count == 0);
    Ok(())
}

async fn notifications_past_the_limit_let_go_of_the_oldest(b: &Backend) -> Result<()> {
    let user = UserId::new();
    let kept = waveline_shared::documents::NOTIFICATIONS_KEPT;
    let mut first = None;
    for n in 0..kept + 3 {
        let new = NewNotification {
            user_id: user,
            kind: NotificationKind::Follow,
            actor: Some(UserId::new()),
            subject: Subject::Nothing,
            created_at: moment(n as i64),
        };
        let stored = b.docs.insert_notification(new).await?;
        first.get_or_insert(stored.id);
    }
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = b.docs.notifications(user, cursor.as_deref(), 100).await?;
        all.extend(page.notifications);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    ensure!(all.len() == kept, "{} kept", all.len());
    ensure!(all.iter().all(|n| Some(n.id) != first), "the oldest went");
    Ok(())
}

async fn deleting_an_account_removes_its_messages_and_notifications(b: &Backend) -> Result<()> {
    let (gone, stays, third) = (UserId::new(), UserId::new(), UserId::new());
    b.docs.send_message(message(gone, stays, "bye", "g-1", moment(0))).await?;
    b.docs.send_message(message(stays, gone, "wait", "s-1", moment(1))).await?;
    let kept = b.docs.send_message(message(stays, third, "hello", "s-2", moment(2))).await?;
    let note = |user, actor| NewNotification {
        user_id: user,
        kind: NotificationKind::Follow,
        actor: Some(actor),
        subject: Subject::Nothing,
        created_at: moment(3),
    };
    b.docs.insert_notification(note(gone, stays)).await?;
    b.docs.insert_notification(note(stays, gone)).await?;
    b.docs.insert_notification(note(stays, third)).await?;
    let removed = b.docs.delete_account(gone).await?;
    ensure!(removed.messages == 2 && removed.notifications == 2, "{removed:?}");
    let left = b.docs.conversations(stays, None, 10).await?;
    ensure!(left.conversations.len() == 1 && left.conversations[0].last_message == kept.message, "{left:?}");
    ensure!(b.docs.conversation_members(conversation_between(gone, stays)).await?.is_none());
    let notes = b.docs.notifications(stays, None, 10).await?;
    ensure!(notes.notifications.len() == 1 && notes.notifications[0].actor == Some(third), "{notes:?}");
    Ok(())
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::init_logging();
                    let backend = super::Backend::postgres().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
        mod mongo {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    super::init_logging();
                    let backend = super::Backend::mongodb().await?;
                    let result = super::$case(&backend).await;
                    backend.cleanup().await?;
                    result
                }
            )*
        }
    };
}

contract!(
    a_comment_reads_back_as_written,
    timestamp_order_pages_through_ties_without_skipping_or_repeating,
    newest_first_is_stable_under_equal_times_and_new_comments,
    a_time_window_bounds_both_orders_inclusively,
    replies_attach_to_their_root_on_the_same_track,
    deleting_a_comment_takes_its_replies_and_nothing_else,
    deleting_a_tracks_comments_leaves_other_tracks_alone,
    deleting_an_account_removes_its_comments_replies_to_them_and_its_activities,
    malformed_and_foreign_cursors_are_refused_with_a_code,
    limits_are_bounded,
    bad_fields_are_refused_with_the_field,
    the_feed_merges_actors_newest_first_through_ties,
    activities_of_an_object_go_all_at_once_or_one_actors,
    the_feed_survives_the_deletion_of_an_accounts_newest_activity,
    comments_are_counted_per_track_in_one_call,
    the_newest_activity_about_each_object_among_actors,
    messages_are_idempotent_by_client_id_and_listed_newest_first,
    conversations_list_the_latest_first_with_exact_unread_counts,
    notifications_keep_the_newest_and_count_the_unread,
    notifications_past_the_limit_let_go_of_the_oldest,
    deleting_an_account_removes_its_messages_and_notifications,
);

/// The MongoDB backend really keeps its documents in MongoDB: read back with the driver,
/// in the shapes the module documents, and gone from there once deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_documents_are_in_mongodb() -> Result<()> {
    init_logging();
    let backend = Backend::mongodb().await?;
    let result = async {
        let mongo = backend.mongo.as_ref().context("mongodb")?;
        let (track, user) = (TrackId::new(), UserId::new());
        let root = comment(&backend, track, user, 42_000, Utc::now()).await?;
        let answer = reply(&backend, &root, user, Utc::now() + Duration::milliseconds(1)).await?;
        let done = backend
            .docs
            .insert_activity(activity(ActivityKind::TrackRepost, user, ActivityObject::Track(track), Utc::now()))
            .await?;

        let comments = mongo.database().collection::<Document>("comments");
        let stored = comments.find_one(doc! {"_id": root.id.to_string()}).await?.context("the root in MongoDB")?;
        ensure!(stored.get_str("track_id")? == track.to_string() && stored.get_str("user_id")? == user.to_string());
        ensure!(stored.get_str("body")? == root.body, "{stored}");
        // Written as a 64-bit integer; the stand-in gives small ones back as 32-bit.
        ensure!(matches!(stored.get("timestamp_ms"), Some(Bson::Int64(42_000) | Bson::Int32(42_000))), "{stored}");
        ensure!(stored.get("reply_to") == Some(&Bson::Null));
        ensure!(stored.get_datetime("created_at")?.timestamp_millis() == root.created_at.timestamp_millis());
        let stored = comments.find_one(doc! {"_id": answer.id.to_string()}).await?.context("the reply")?;
        ensure!(stored.get_str("reply_to")? == root.id.to_string());
        ensure!(comments.count_documents(doc! {"track_id": track.to_string()}).await? == 2);

        let activities = mongo.database().collection::<Document>("activities");
        let stored = activities.find_one(doc! {"_id": done.id.to_string()}).await?.context("the activity")?;
        ensure!(stored.get_str("kind")? == "track_repost" && stored.get_str("actor")? == user.to_string());
        ensure!(stored.get_str("object_id")? == track.to_string());

        backend.docs.delete_track_comments(track).await?;
        ensure!(comments.count_documents(doc! {"track_id": track.to_string()}).await? == 0);
        Ok(())
    }
    .await;
    backend.cleanup().await?;
    result
}
