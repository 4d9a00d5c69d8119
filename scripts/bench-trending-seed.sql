-- The trending benchmark's data (scripts/bench.sh trending), written straight into a migrated
-- database: :users accounts, :tracks public ready tracks uploaded over the last 60 days (half
-- of them young enough for trending), :plays counted plays over the last 60 days in hourly
-- buckets, skewed towards popular tracks (a track's share falls with its rank, as real
-- listening does), and likes, reposts and comments in proportion (a like per 10 plays, a
-- repost per 50, a comment per 100). random() is seeded, so every run builds the same shape.
--
--   psql -v users=10000 -v tracks=100000 -v plays=1000000 -f scripts/bench-trending-seed.sql DATABASE_URL
\set ON_ERROR_STOP on
\set QUIET on
BEGIN;
DO $$ BEGIN PERFORM setseed(0.1717); END $$;
-- No triggers while seeding (no status notification per track row, no foreign-key trigger per
-- row: the rows are consistent by construction). CHECK constraints still apply.
SET LOCAL session_replication_role = replica;

CREATE TEMP TABLE seed_users AS
SELECT n, gen_random_uuid() AS id FROM generate_series(1, :users) n;
CREATE UNIQUE INDEX ON seed_users (n);
INSERT INTO users (id, email, username, password_hash, created_at)
SELECT id, 'trend' || n || '@bench.invalid', 'trend_' || n, NULL, now() - interval '90 days' FROM seed_users;

CREATE TEMP TABLE seed_tracks AS
SELECT n, gen_random_uuid() AS id, 1 + (n - 1) % :users AS owner,
       now() - random() * interval '60 days' AS created_at
FROM generate_series(1, :tracks) n;
CREATE UNIQUE INDEX ON seed_tracks (n);
INSERT INTO tracks (id, owner_id, title, genre, visibility, state, revision, ready_revision, duration_ms,
                    created_at, updated_at, state_changed_at)
SELECT t.id, u.id, 'Trend ' || t.n,
       (ARRAY['house', 'techno', 'ambient', 'hip hop', 'jazz', 'drum & bass', 'pop', 'folk'])[1 + t.n % 8],
       'public', 'ready', 1, 1, 180000, t.created_at, t.created_at, t.created_at
FROM seed_tracks t JOIN seed_users u ON u.n = t.owner;

-- A play's track: rank r with probability falling as r grows (random()^3 crowds the low
-- ranks), at a random hour since the track's upload.
INSERT INTO play_hours (track_id, hour, plays)
SELECT id, hour, count(*)
FROM (
    SELECT t.id, date_trunc('hour', t.created_at + random() * (now() - t.created_at), 'UTC') AS hour
    FROM (SELECT 1 + floor(:tracks * random() ^ 3)::int AS n FROM generate_series(1, :plays)) p
    JOIN seed_tracks t USING (n)
) s
GROUP BY 1, 2;
UPDATE tracks t SET playback_count = p.plays
FROM (SELECT track_id, sum(plays) AS plays FROM play_hours GROUP BY 1) p WHERE p.track_id = t.id;

-- Likes and reposts: one account at most once per track.
INSERT INTO track_likes (user_id, track_id, created_at)
SELECT DISTINCT ON (u.id, t.id) u.id, t.id, t.created_at + random() * (now() - t.created_at)
FROM (SELECT 1 + floor(:users * random())::int AS un, 1 + floor(:tracks * random() ^ 3)::int AS tn
      FROM generate_series(1, :plays / 10)) x
JOIN seed_users u ON u.n = x.un JOIN seed_tracks t ON t.n = x.tn
ON CONFLICT DO NOTHING;
INSERT INTO track_reposts (user_id, track_id, created_at)
SELECT DISTINCT ON (u.id, t.id) u.id, t.id, t.created_at + random() * (now() - t.created_at)
FROM (SELECT 1 + floor(:users * random())::int AS un, 1 + floor(:tracks * random() ^ 3)::int AS tn
      FROM generate_series(1, :plays / 50)) x
JOIN seed_users u ON u.n = x.un JOIN seed_tracks t ON t.n = x.tn
ON CONFLICT DO NOTHING;
INSERT INTO comment_hours (track_id, hour, comments)
SELECT id, hour, count(*)
FROM (
    SELECT t.id, date_trunc('hour', t.created_at + random() * (now() - t.created_at), 'UTC') AS hour
    FROM (SELECT 1 + floor(:tracks * random() ^ 3)::int AS n FROM generate_series(1, :plays / 100)) p
    JOIN seed_tracks t USING (n)
) s
GROUP BY 1, 2;
COMMIT;
VACUUM ANALYZE;
