-- The search benchmark's data (scripts/bench.sh search), written straight into a migrated
-- database: :users accounts, :tracks tracks and :playlists playlists with varied names.
--
-- Titles, tags, genres and descriptions draw their words from one vocabulary of 400, skewed
-- as real catalogues are (a word's chance falls with its rank: the commonest is in about one
-- title of eight, most are in a few hundred), with accented words among them (Beyoncé,
-- Sigur Rós, café, …) and a few artist names. 94 % of the tracks are public and ready, 4 %
-- private, 2 % still processing. The account :'viewer' (registered through the API
-- beforehand) blocks 100 accounts, so its searches pay for the block checks. random() is
-- seeded, so every run builds the same shape (ids differ).
--
--   psql -v users=10000 -v tracks=100000 -v playlists=10000 -v viewer=UUID \
--        -f scripts/bench-search-seed.sql DATABASE_URL
\set ON_ERROR_STOP on
\set QUIET on
BEGIN;
DO $$ BEGIN PERFORM setseed(0.2718); END $$;
-- No triggers while seeding (no status notification per row; the rows are consistent by
-- construction). CHECK constraints and generated columns still apply.
SET LOCAL session_replication_role = replica;

CREATE FUNCTION pg_temp.uuid7(ms bigint) RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex(ms), 12, '0') || '7' || substr(replace(gen_random_uuid()::text, '-', ''), 14))::uuid
$$;
CREATE FUNCTION pg_temp.at_ms(ms bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT timestamptz 'epoch' + ms * interval '1 millisecond'
$$;

CREATE TEMP TABLE seed_now AS SELECT (extract(epoch FROM now()) * 1000)::bigint AS ms;

-- The vocabulary, commonest first.
CREATE TEMP TABLE seed_words AS
SELECT n - 1 AS rank, word FROM unnest(string_to_array(
    'love night remix live dream summer dance heart fire time light city blue feel girl baby '
 || 'world soul rain moon home sun gold party deep house sky star ocean shadow river wild '
 || 'electric midnight forever young lost road rose storm winter heaven angel paradise fever '
 || 'dreamer echo silver thunder wave mirror glass crystal velvet neon sunset sunrise horizon '
 || 'desert island garden forest mountain valley freedom memory story song tears smile kiss '
 || 'touch dancing running falling flying burning shining rising waiting calling breathing '
 || 'beyoncé café rosé señor niño mañana corazón canción música ángel après déjà naïve '
 || 'björk sigur rós mötley crüe zoé élan fiancée piñata jalapeño crème brûlée '
 || 'daft punk deadmau5 skrillex aphex twin boards canada burial bonobo tycho moderat caribou '
 || 'kiasmos odesza disclosure flume kaytranada jamie nils frahm ólafur arnalds '
 || 'bass drop beat groove vibe chill lofi ambient techno trance dubstep jungle garage '
 || 'acid minimal disco funk soul jazz blues rock punk metal indie folk pop trap drill grime '
 || 'orchestra piano guitar violin cello synth drums vocal choir strings brass harp '
 || 'morning evening weekend tonight yesterday tomorrow always never again alone together '
 || 'broken golden hidden frozen stolen chosen fallen forgotten endless timeless restless '
 || 'sweet bitter dark bright cold warm soft loud slow fast high low free true pure '
 || 'red green black white purple pink orange yellow violet scarlet indigo amber '
 || 'paris tokyo berlin london lagos havana istanbul reykjavík montréal são paulo zürich '
 || 'kraków málaga córdoba bogotá medellín querétaro '
 || 'one two three four five seven nine hundred thousand million '
 || 'machine ghost robot signal static circuit pulse orbit gravity galaxy planet comet '
 || 'satellite rocket station tunnel bridge harbor lighthouse cathedral palace temple '
 || 'letter promise secret whisper silence thunderbolt hurricane tornado avalanche '
 || 'tiger wolf eagle raven fox lion dragon phoenix serpent butterfly dolphin whale '
 || 'coffee sugar honey cherry lemon mango peach vanilla cinnamon pepper salt '
 || 'session mix edit version dub instrumental acoustic demo bootleg mashup rework extended '
 || 'intro outro interlude reprise prelude overture anthem lullaby ballad serenade requiem '
 || 'voyage journey escape return arrival departure highway skyline downtown uptown '
 || 'kingdom empire republic nation tribe family brother sister mother father children',
    ' ')) WITH ORDINALITY AS v(word, n);
CREATE TEMP TABLE seed_vocabulary AS SELECT array_agg(word ORDER BY rank) AS words FROM seed_words;
-- A word, skewed toward the commonest: the one at rank floor(N * u^3).
CREATE FUNCTION pg_temp.word() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT words[1 + floor(cardinality(words) * random() ^ 3)::int] FROM seed_vocabulary
$$;
CREATE FUNCTION pg_temp.capital(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT upper(left($1, 1)) || substr($1, 2)
$$;

-- Accounts, created 200 to 100 days ago. Usernames of one or two words and a number; display
-- names of two capitalised words.
CREATE TEMP TABLE seed_users AS
SELECT n, pg_temp.uuid7(ms) AS id, ms, w1, w2
FROM (SELECT n, (SELECT ms FROM seed_now) - 200 * 86400000::bigint + n * (100 * 86400000::bigint / :users) AS ms,
             pg_temp.word() AS w1, pg_temp.word() AS w2
      FROM generate_series(1, :users) n) s;
CREATE UNIQUE INDEX ON seed_users (n);

INSERT INTO users (id, email, username, password_hash, created_at, email_verified_at, display_name, bio)
SELECT id, 'user' || n || '@bench.invalid',
       left(regexp_replace(lower(waveline_unaccent(w1 || CASE WHEN n % 3 = 0 THEN '_' || w2 ELSE '' END)),
                           '[^a-z0-9_-]', '', 'g'), 20) || '_' || n,
       NULL, pg_temp.at_ms(ms), pg_temp.at_ms(ms),
       pg_temp.capital(w1) || ' ' || pg_temp.capital(w2), 'Music from the ' || w2 || ' side.'
FROM seed_users ORDER BY n;
-- 1 % of the accounts are suspended.
UPDATE users SET suspended_at = now() WHERE id IN (SELECT id FROM seed_users WHERE n % 100 = 7);

-- Tracks over the last 90 days: titles of 2 to 4 words, 1 to 3 tags, a genre, a sentence.
CREATE TEMP TABLE seed_tracks AS
SELECT n, pg_temp.uuid7(ms) AS id, 1 + (n - 1) % :users AS owner, ms,
       pg_temp.capital(pg_temp.word()) || ' ' || pg_temp.capital(pg_temp.word())
         || CASE WHEN random() < 0.6 THEN ' ' || pg_temp.capital(pg_temp.word()) ELSE '' END
         || CASE WHEN random() < 0.3 THEN ' (' || pg_temp.capital(pg_temp.word()) || ' Remix)' ELSE '' END AS title,
       ARRAY(SELECT pg_temp.word() FROM generate_series(1, 1 + (n % 3))) AS tags,
       (ARRAY['electronic', 'house', 'techno', 'hip hop', 'pop', 'rock', 'ambient', 'jazz', 'classical', 'folk',
              'drum & bass', 'dubstep', 'r&b', 'soul', 'reggaetón', 'latin', 'métal', 'indie', 'lo-fi', 'trap'])
           [1 + floor(random() * 20)::int] AS genre,
       'A ' || pg_temp.word() || ' track about ' || pg_temp.word() || ' and ' || pg_temp.word() || '.' AS description,
       CASE WHEN n % 50 = 3 THEN 'processing' WHEN n % 25 = 4 THEN 'private' ELSE 'public' END AS kind,
       60000 + (random() * 540000)::bigint AS duration_ms
FROM (SELECT n, (SELECT ms FROM seed_now) - 3600000 - (random() * 90 * 86400000)::bigint AS ms
      FROM generate_series(1, :tracks) n) s;

INSERT INTO tracks (id, owner_id, title, description, genre, tags, visibility, state, stage, attempts, revision,
                    ready_revision, original_key, original_size, duration_ms, admitted_ms, created_at,
                    updated_at, state_changed_at)
SELECT t.id, u.id, left(t.title, 200), t.description, t.genre, t.tags,
       CASE WHEN t.kind = 'private' THEN 'private' ELSE 'public' END,
       CASE WHEN t.kind = 'processing' THEN 'processing' ELSE 'ready' END,
       CASE WHEN t.kind = 'processing' THEN 'encoding' END, 1, 1,
       CASE WHEN t.kind = 'processing' THEN NULL ELSE 1 END,
       'originals/' || t.id || '/source', t.duration_ms * 176,
       CASE WHEN t.kind = 'processing' THEN NULL ELSE t.duration_ms END, t.duration_ms,
       pg_temp.at_ms(t.ms), pg_temp.at_ms(t.ms), pg_temp.at_ms(t.ms)
FROM seed_tracks t JOIN seed_users u ON u.n = t.owner
ORDER BY t.ms;

INSERT INTO renditions (track_id, revision, preset, kind, storage_key, storage_keys, codec, bitrate_kbps,
                        sample_rate, channels, duration_ms, bytes, created_at)
SELECT t.id, 1, 'mp3_128', 'progressive', 'renditions/' || t.id || '/1/mp3_128/audio.mp3',
       ARRAY['renditions/' || t.id || '/1/mp3_128/audio.mp3'], 'mp3', 128, 44100, 2, t.duration_ms,
       t.duration_ms * 16, pg_temp.at_ms(t.ms)
FROM seed_tracks t WHERE t.kind <> 'processing';

-- Playlists: two or three words, 5 to 20 tracks each; one in ten private.
CREATE TEMP TABLE seed_playlists AS
SELECT n, pg_temp.uuid7(ms) AS id, 1 + (n * 7) % :users AS owner, ms,
       pg_temp.capital(pg_temp.word()) || ' ' || pg_temp.capital(pg_temp.word())
         || CASE WHEN random() < 0.5 THEN ' ' || pg_temp.capital(pg_temp.word()) ELSE '' END AS title,
       CASE WHEN n % 10 = 5 THEN 'private' ELSE 'public' END AS visibility
FROM (SELECT n, (SELECT ms FROM seed_now) - (random() * 90 * 86400000)::bigint AS ms
      FROM generate_series(1, :playlists) n) s;

INSERT INTO playlists (id, owner_id, title, description, visibility, created_at, updated_at)
SELECT p.id, u.id, p.title, 'Songs for ' || pg_temp.word() || ' days.', p.visibility, pg_temp.at_ms(p.ms),
       pg_temp.at_ms(p.ms)
FROM seed_playlists p JOIN seed_users u ON u.n = p.owner ORDER BY p.ms;

INSERT INTO playlist_tracks (playlist_id, position, track_id)
SELECT p.id, k - 1, t.id
FROM seed_playlists p
CROSS JOIN LATERAL generate_series(1, 5 + p.n % 16) k
JOIN seed_tracks t ON t.n = 1 + (p.n * 131 + k * 7919) % :tracks;

-- Some likes, so the views' counts have something to count: 200,000 over random tracks.
INSERT INTO track_likes (user_id, track_id)
SELECT DISTINCT u.id, t.id
FROM generate_series(1, 200000) g
JOIN seed_users u ON u.n = 1 + floor(random() * :users)::int
JOIN seed_tracks t ON t.n = 1 + floor(random() * :tracks)::int
ON CONFLICT DO NOTHING;

-- The viewer blocks 100 accounts.
INSERT INTO blocks (blocker_id, blocked_id)
SELECT :'viewer', id FROM seed_users WHERE n % 100 = 42;

COMMIT;

SELECT (SELECT count(*) FROM users WHERE role = 'user') AS accounts, (SELECT count(*) FROM tracks) AS tracks,
       (SELECT count(*) FROM tracks WHERE visibility = 'public' AND ready_revision IS NOT NULL) AS public_ready,
       (SELECT count(*) FROM playlists) AS playlists;
