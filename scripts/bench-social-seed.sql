-- The social benchmark's data (scripts/bench.sh social), written straight into a migrated
-- database: :users accounts, :tracks public ready tracks, :activities activities in
-- activity_documents (one `track` activity per track, the rest `track_repost`s, each with its
-- track_reposts row), and :followed accounts followed by the account :'viewer' (registered
-- through the API beforehand). Times spread over the last 90 days; ids are UUIDv7 carrying
-- their row's creation millisecond, as the application makes them (the documents layer relies
-- on it for activities: created_at is the millisecond the id carries). random() is seeded, so
-- every run builds the same shape (ids differ).
--
--   psql -v users=10000 -v tracks=100000 -v activities=1000000 -v followed=1000 \
--        -v viewer=UUID -f scripts/bench-social-seed.sql DATABASE_URL
\set ON_ERROR_STOP on
\set QUIET on
BEGIN;
DO $$ BEGIN PERFORM setseed(0.4242); END $$;
-- No triggers while seeding: no status notification per track row, and no foreign-key
-- trigger per row (the rows are consistent by construction; the checks at the end verify
-- it). CHECK constraints still apply.
SET LOCAL session_replication_role = replica;

-- A UUIDv7 carrying the millisecond `ms`: the 48-bit time, version 7, then 74 random bits
-- with the RFC 9562 variant (10xx), taken from a random version-4 UUID.
CREATE FUNCTION pg_temp.uuid7(ms bigint) RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex(ms), 12, '0') || '7' || substr(replace(gen_random_uuid()::text, '-', ''), 14))::uuid
$$;
-- The instant of a millisecond since the epoch, exactly (no floating point).
CREATE FUNCTION pg_temp.at_ms(ms bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT timestamptz 'epoch' + ms * interval '1 millisecond'
$$;

CREATE TEMP TABLE seed_now AS SELECT (extract(epoch FROM now()) * 1000)::bigint AS ms;

-- Accounts: created 120 to 100 days ago.
CREATE TEMP TABLE seed_users AS
SELECT n, pg_temp.uuid7(ms) AS id, ms
FROM (SELECT n, (SELECT ms FROM seed_now) - 120 * 86400000::bigint + n * (20 * 86400000::bigint / :users) AS ms
      FROM generate_series(1, :users) n) s;
CREATE UNIQUE INDEX ON seed_users (n);

INSERT INTO users (id, email, username, password_hash, created_at, email_verified_at)
SELECT id, 'user' || n || '@bench.invalid', 'user_' || n, NULL, pg_temp.at_ms(ms), pg_temp.at_ms(ms)
FROM seed_users ORDER BY n;

-- Tracks: the same number per account (owner n, n + users, …), uploaded over the last 90 days
-- (until an hour ago), ready and posted (announced) 10 to 300 s after the upload, 1 to 10
-- minutes long.
CREATE TEMP TABLE seed_tracks AS
SELECT n, pg_temp.uuid7(ms) AS id, 1 + (n - 1) % :users AS owner, ms,
       ms + 10000 + (random() * 290000)::bigint AS posted_ms, 60000 + (random() * 540000)::bigint AS duration_ms
FROM (SELECT n, (SELECT ms FROM seed_now) - 3600000 - (random() * 90 * 86400000)::bigint AS ms
      FROM generate_series(1, :tracks) n) s;
CREATE UNIQUE INDEX ON seed_tracks (n);

INSERT INTO tracks (id, owner_id, title, description, genre, tags, visibility, state, attempts, revision,
                    ready_revision, original_key, original_size, duration_ms, admitted_ms, waveform_key,
                    waveform_dat_key, waveform_summary_key, enqueued_at, claimed_at, announced_at,
                    created_at, updated_at, state_changed_at)
SELECT t.id, u.id, 'Track ' || t.n, 'Seeded by scripts/bench.sh social.', 'electronic', '{bench}', 'public',
       'ready', 1, 1, 1, 'originals/' || t.id || '/source', t.duration_ms * 176, t.duration_ms, t.duration_ms,
       'renditions/' || t.id || '/1/waveform/waveform.json', 'renditions/' || t.id || '/1/waveform/waveform.dat',
       'renditions/' || t.id || '/1/waveform/summary.json', pg_temp.at_ms(t.ms), pg_temp.at_ms(t.ms),
       pg_temp.at_ms(t.posted_ms), pg_temp.at_ms(t.ms), pg_temp.at_ms(t.posted_ms), pg_temp.at_ms(t.posted_ms)
FROM seed_tracks t JOIN seed_users u ON u.n = t.owner
ORDER BY t.ms;

-- The default ladder's renditions of revision 1, as a finished job records them.
INSERT INTO renditions (track_id, revision, preset, kind, storage_key, storage_keys, codec, bitrate_kbps,
                        sample_rate, channels, duration_ms, bytes, created_at)
SELECT t.id, 1, p.preset, p.kind, 'renditions/' || t.id || '/1/' || p.file,
       ARRAY['renditions/' || t.id || '/1/' || p.file], p.codec, p.kbps, p.rate, 2,
       least(t.duration_ms, p.max_ms), least(t.duration_ms, p.max_ms) * p.kbps / 8, pg_temp.at_ms(t.posted_ms)
FROM seed_tracks t
CROSS JOIN (VALUES ('mp3_128', 'progressive', 'mp3_128/audio.mp3', 'mp3', 128, 44100, 86400000::bigint),
                   ('aac_hls', 'hls', 'aac_hls/master.m3u8', 'aac', 160, 44100, 86400000),
                   ('opus_64', 'progressive', 'opus_64/audio.opus', 'opus', 64, 48000, 86400000),
                   ('preview', 'progressive', 'preview/audio.mp3', 'mp3', 128, 44100, 30000))
     AS p(preset, kind, file, codec, kbps, rate, max_ms)
ORDER BY t.ms, p.preset;

-- Reposts: the rest of the activities, each of a random track by a random account other than
-- its owner, once per account and track, at a random time between the track's post and now.
CREATE TEMP TABLE seed_reposts AS
WITH picks AS MATERIALIZED (
    SELECT 1 + floor(random() * :tracks)::int AS track, floor(random() * (:users - 1))::int AS step, random() AS frac
    FROM generate_series(1, (:activities - :tracks) * 101 / 100)
), pairs AS (
    SELECT DISTINCT ON (actor, p.track) 1 + (t.owner + p.step) % :users AS actor, p.track, p.frac
    FROM picks p JOIN seed_tracks t ON t.n = p.track
    ORDER BY actor, p.track
)
SELECT p.actor, t.id AS track_id, t.posted_ms + (p.frac * ((SELECT ms FROM seed_now) - t.posted_ms))::bigint AS ms
FROM (SELECT * FROM pairs ORDER BY random() LIMIT :activities - :tracks) p JOIN seed_tracks t ON t.n = p.track;

INSERT INTO track_reposts (user_id, track_id, created_at)
SELECT u.id, r.track_id, pg_temp.at_ms(r.ms)
FROM seed_reposts r JOIN seed_users u ON u.n = r.actor
ORDER BY r.ms;

INSERT INTO activity_documents (id, kind, actor, object_id, created_at)
SELECT pg_temp.uuid7(ms), kind, actor, object_id, pg_temp.at_ms(ms)
FROM (SELECT t.posted_ms AS ms, 'track' AS kind, u.id AS actor, t.id AS object_id
      FROM seed_tracks t JOIN seed_users u ON u.n = t.owner
      UNION ALL
      SELECT r.ms, 'track_repost', u.id, r.track_id
      FROM seed_reposts r JOIN seed_users u ON u.n = r.actor) a
ORDER BY ms;
-- Each actor's newest activity, as the triggers (off while seeding) keep it.
INSERT INTO activity_heads (actor, created_at, id)
SELECT DISTINCT ON (actor) actor, created_at, id FROM activity_documents ORDER BY actor, created_at DESC, id DESC;

-- The viewer follows :followed of the accounts, followed over the last 100 days.
INSERT INTO follows (follower_id, followee_id, created_at)
SELECT :'viewer', id, pg_temp.at_ms((SELECT ms FROM seed_now) - (random() * 100 * 86400000)::bigint)
FROM (SELECT id FROM seed_users ORDER BY random() LIMIT :followed) f;

-- What the triggers would have checked, and what the documents layer relies on.
DO $$
DECLARE bad bigint;
BEGIN
    SELECT count(*) INTO bad FROM tracks t LEFT JOIN users u ON u.id = t.owner_id WHERE u.id IS NULL;
    IF bad > 0 THEN RAISE EXCEPTION '% tracks without their owner', bad; END IF;
    SELECT count(*) INTO bad FROM activity_documents a LEFT JOIN users u ON u.id = a.actor WHERE u.id IS NULL;
    IF bad > 0 THEN RAISE EXCEPTION '% activities without their actor', bad; END IF;
    SELECT count(*) INTO bad FROM activity_documents a LEFT JOIN tracks t ON t.id = a.object_id WHERE t.id IS NULL;
    IF bad > 0 THEN RAISE EXCEPTION '% activities without their track', bad; END IF;
    SELECT count(*) INTO bad FROM activity_documents a JOIN tracks t ON t.id = a.object_id
    WHERE a.kind = 'track_repost' AND a.actor = t.owner_id;
    IF bad > 0 THEN RAISE EXCEPTION '% reposts of their own track', bad; END IF;
    SELECT count(*) INTO bad FROM activity_documents
    WHERE substr(replace(id::text, '-', ''), 1, 12) <> lpad(to_hex((extract(epoch FROM created_at) * 1000)::bigint), 12, '0')
       OR created_at <> date_trunc('milliseconds', created_at)
       OR substr(id::text, 15, 1) <> '7' OR substr(id::text, 20, 1) NOT IN ('8', '9', 'a', 'b');
    IF bad > 0 THEN RAISE EXCEPTION '% activities whose id does not carry their millisecond', bad; END IF;
    SELECT count(*) INTO bad FROM follows f LEFT JOIN users u ON u.id = f.follower_id WHERE u.id IS NULL;
    IF bad > 0 THEN RAISE EXCEPTION 'the viewer is not an account'; END IF;
END
$$;
COMMIT;

SELECT (SELECT count(*) FROM users WHERE role = 'user') AS accounts, (SELECT count(*) FROM tracks) AS tracks,
       (SELECT count(*) FROM activity_documents) AS activities,
       (SELECT count(*) FROM activity_documents WHERE kind = 'track_repost') AS reposts,
       (SELECT count(*) FROM follows WHERE follower_id = :'viewer') AS followed;
