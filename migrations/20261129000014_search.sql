-- Search (shared/src/db/search.rs): full-text search over tracks, accounts and playlists,
-- folded for accents, with trigram similarity for the queries whose words match nothing.
--
-- Both extensions ship with PostgreSQL (Debian's postgresql-15 includes them) and are
-- trusted: a role with CREATE on the database may create them.
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- unaccent(text) is only STABLE: it finds its dictionary through the search_path at each call.
-- With the dictionary named, bound when this function is created (a SQL-standard body resolves
-- its names once), the result depends on the text alone, so generated columns and expression
-- indexes may use it.
CREATE FUNCTION waveline_unaccent(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN unaccent('unaccent'::regdictionary, $1);

-- What a track is found by: its title first (A), then its tags, genre and the artist its
-- file names (B), then its description and the album its file names (C). The `simple`
-- configuration: every word as written (lower-cased, accents folded), no stemming and no stop
-- words, so a word being typed matches as a prefix of the stored one.
CREATE FUNCTION waveline_track_document(title text, tags text[], genre text, description text, file_tags jsonb)
    RETURNS tsvector LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN setweight(to_tsvector('simple', waveline_unaccent(title)), 'A')
        || setweight(to_tsvector('simple', waveline_unaccent(
               coalesce(array_to_string(tags, ' '), '') || ' ' || coalesce(genre, '') || ' '
               || coalesce(file_tags ->> 'artist', ''))), 'B')
        || setweight(to_tsvector('simple', waveline_unaccent(
               coalesce(description, '') || ' ' || coalesce(file_tags ->> 'album', ''))), 'C');

ALTER TABLE tracks ADD COLUMN search_document tsvector
    GENERATED ALWAYS AS (waveline_track_document(title, tags, genre, description, track_tags)) STORED;
CREATE INDEX tracks_search ON tracks USING gin (search_document);
-- Titles by trigram, for queries with a typo.
CREATE INDEX tracks_title_trigrams ON tracks USING gin (waveline_unaccent(title) gin_trgm_ops);

-- An account is found by its username and display name alike.
ALTER TABLE users ADD COLUMN search_document tsvector
    GENERATED ALWAYS AS (setweight(to_tsvector('simple', waveline_unaccent(username || ' ' || display_name)), 'A'))
    STORED;
CREATE INDEX users_search ON users USING gin (search_document);
CREATE INDEX users_name_trigrams ON users USING gin (waveline_unaccent(username || ' ' || display_name) gin_trgm_ops);
-- Searches leave out what suspended accounts own: a probe of this small index per candidate.
CREATE INDEX users_suspended ON users (id) WHERE suspended_at IS NOT NULL;

-- A playlist by its title (A) and description (C).
ALTER TABLE playlists ADD COLUMN search_document tsvector
    GENERATED ALWAYS AS (setweight(to_tsvector('simple', waveline_unaccent(title)), 'A')
                         || setweight(to_tsvector('simple', waveline_unaccent(description)), 'C')) STORED;
CREATE INDEX playlists_search ON playlists USING gin (search_document);
CREATE INDEX playlists_title_trigrams ON playlists USING gin (waveline_unaccent(title) gin_trgm_ops);

-- The query of a search: `words` are the query's runs of letters and digits (the API splits
-- them; nothing else of the text reaches here), each folded as the documents are; every word
-- must match, and with `prefix` the last one as the beginning of a word. Each word is quoted
-- for to_tsquery once the quotes and backslashes folding could produce are gone (ŉ folds to
-- 'n), so no text of a query is ever read as tsquery syntax.
CREATE FUNCTION waveline_search_query(words text[], prefix boolean) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN to_tsquery('simple', (
        SELECT coalesce(string_agg('''' || w.folded || ''''
                                   || CASE WHEN prefix AND x.n = cardinality(words) THEN ':*' ELSE '' END,
                                   ' & ' ORDER BY x.n), '')
        FROM unnest(words) WITH ORDINALITY AS x(word, n)
        CROSS JOIN LATERAL (SELECT translate(waveline_unaccent(x.word), '''\', '') AS folded) w
        WHERE w.folded <> ''));
