//! The schema and the track repository on a real PostgreSQL: migrations apply to an empty
//! database and again as a no-op, and every state change is a compare-and-set that exactly
//! one of several racing actors wins.

use anyhow::{Result, ensure};
use waveline_shared::db::{self, Failure, PgTracks, SYSTEM_USER};
use waveline_shared::domain::{ProcessingStage, TrackState};
use waveline_tests::TestDb;

#[tokio::test]
async fn migrations_apply_once_and_seed_the_system_account() -> Result<()> {
    let test = TestDb::new().await?;
    ensure!(db::migrate(&test.pool).await?.is_empty(), "a second run applied something");
    let (username, role): (String, String) = sqlx::query_as("SELECT username, role FROM users WHERE id = $1")
        .bind(SYSTEM_USER)
        .fetch_one(&test.pool)
        .await?;
    ensure!(username == "system" && role == "system");
    Ok(())
}

#[tokio::test]
async fn a_track_walks_the_happy_path() -> Result<()> {
    let test = TestDb::new().await?;
    let tracks = PgTracks::new(test.pool.clone());
    let track = tracks.create(SYSTEM_USER, "Night Drive", TrackState::Uploaded, Some("originals/x/source")).await?;
    ensure!(track.state == TrackState::Uploaded && track.revision == 1 && track.attempts == 0);
    ensure!(tracks.transition(track.id, TrackState::Uploaded, TrackState::Queued, None).await?);
    ensure!(tracks.transition(track.id, TrackState::Queued, TrackState::Processing, None).await?);
    let processing = tracks.get(track.id).await?.expect("exists");
    ensure!(processing.stage == Some(ProcessingStage::Probing) && processing.attempts == 1, "{processing:?}");
    ensure!(tracks.transition(track.id, TrackState::Processing, TrackState::Ready, None).await?);
    let ready = tracks.get(track.id).await?.expect("exists");
    ensure!(ready.state == TrackState::Ready && ready.stage.is_none() && ready.progress == 100, "{ready:?}");
    // Reprocessing starts a new revision with a clean attempt count.
    ensure!(tracks.transition(track.id, TrackState::Ready, TrackState::Queued, None).await?);
    let requeued = tracks.get(track.id).await?.expect("exists");
    ensure!(requeued.revision == 2 && requeued.attempts == 0, "{requeued:?}");
    Ok(())
}

#[tokio::test]
async fn a_stale_transition_changes_nothing() -> Result<()> {
    let test = TestDb::new().await?;
    let tracks = PgTracks::new(test.pool.clone());
    let track = tracks.create(SYSTEM_USER, "Late Job", TrackState::Uploaded, None).await?;
    tracks.transition(track.id, TrackState::Uploaded, TrackState::Queued, None).await?;
    tracks.transition(track.id, TrackState::Queued, TrackState::Processing, None).await?;
    let failure = Failure { code: "corrupt_audio", message: "frame 12 is damaged" };
    ensure!(tracks.transition(track.id, TrackState::Processing, TrackState::Failed, Some(failure)).await?);
    // A duplicate job arrives late: its claim finds the track no longer queued.
    ensure!(!tracks.transition(track.id, TrackState::Queued, TrackState::Processing, None).await?);
    let failed = tracks.get(track.id).await?.expect("exists");
    ensure!(failed.state == TrackState::Failed && failed.attempts == 1, "{failed:?}");
    ensure!(failed.error_code.as_deref() == Some("corrupt_audio"));
    ensure!(failed.error_message.as_deref() == Some("frame 12 is damaged"));
    // Moves the state machine forbids are refused before reaching SQL.
    let backwards = tracks.transition(track.id, TrackState::Ready, TrackState::Processing, None).await;
    ensure!(matches!(backwards, Err(ref err) if err.code() == "invalid_request"), "{backwards:?}");
    let unexplained = tracks.transition(track.id, TrackState::Queued, TrackState::Failed, None).await;
    ensure!(unexplained.is_err(), "failed without a reason was accepted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_many_racing_claims_wins() -> Result<()> {
    let test = TestDb::new().await?;
    let tracks = PgTracks::new(test.pool.clone());
    let track = tracks.create(SYSTEM_USER, "Contended", TrackState::Uploaded, None).await?;
    tracks.transition(track.id, TrackState::Uploaded, TrackState::Queued, None).await?;
    let claims: Vec<_> = (0..8)
        .map(|_| {
            let tracks = tracks.clone();
            tokio::spawn(
                async move { tracks.transition(track.id, TrackState::Queued, TrackState::Processing, None).await },
            )
        })
        .collect();
    let mut won = 0;
    for claim in claims {
        won += usize::from(claim.await??);
    }
    ensure!(won == 1, "{won} claims won");
    ensure!(tracks.get(track.id).await?.expect("exists").attempts == 1);
    let counts = tracks.count_by_state().await?;
    ensure!(counts.iter().any(|(state, n)| *state == TrackState::Processing && *n == 1), "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn the_schema_rejects_inconsistent_rows() -> Result<()> {
    let test = TestDb::new().await?;
    // A processing track must carry a stage; a failed one a reason; usernames follow the rule.
    let bad_rows = [
        "INSERT INTO tracks (id, owner_id, title, state) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 't', 'processing')",
        "INSERT INTO tracks (id, owner_id, title, state) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 't', 'failed')",
        "INSERT INTO tracks (id, owner_id, title, state) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 't', 'done')",
        "INSERT INTO users (id, email, username) VALUES (gen_random_uuid(), 'a@b.c', 'Has Spaces')",
        "INSERT INTO users (id, email, username) VALUES (gen_random_uuid(), 'SYSTEM@waveline.invalid', 'other')",
    ];
    for sql in bad_rows {
        ensure!(sqlx::query(sql).execute(&test.pool).await.is_err(), "accepted: {sql}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_runs_in_one_process_at_a_time() -> Result<()> {
    use std::time::Duration;
    let test = TestDb::new().await?;
    // Another process holds the reconciler's advisory lock.
    let mut other = test.pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(0x5741_5645_4c49_4e45_i64).execute(&mut *other).await?;
    let skipped = db::reconcile(&test.pool, Duration::from_secs(1), Duration::from_secs(1), 5).await?;
    ensure!(skipped.is_none(), "ran while another process held the lock");
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(0x5741_5645_4c49_4e45_i64).execute(&mut *other).await?;
    drop(other);
    let ran = db::reconcile(&test.pool, Duration::from_secs(1), Duration::from_secs(1), 5).await?;
    ensure!(ran.is_some(), "did not run once the lock was free");
    Ok(())
}
