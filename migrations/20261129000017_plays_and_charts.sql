-- Plays, engagement by the hour, and the charts computed from them.
--
-- A play is counted at most once per listener and track per dedup window (30 min by default):
-- `play_listeners` remembers when each listener's last counted play of a track began, and a
-- batch of plays counts only the rows whose upsert it won. Counted plays land in hourly
-- buckets (`play_hours`) and in `tracks.playback_count`, in the same statement, so the
-- counter always equals the sum of its buckets.

ALTER TABLE tracks
    ADD COLUMN playback_count bigint NOT NULL DEFAULT 0 CHECK (playback_count >= 0),
    ADD COLUMN preview_playback_count bigint NOT NULL DEFAULT 0 CHECK (preview_playback_count >= 0);

-- The listener is a keyed hash (16 bytes) of the account, or of the client's address and user
-- agent; rows older than the window are removed by the charts tick.
CREATE TABLE play_listeners (
    track_id uuid        NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    listener bytea       NOT NULL CHECK (octet_length(listener) = 16),
    preview  boolean     NOT NULL,
    last_at  timestamptz NOT NULL,
    PRIMARY KEY (track_id, listener, preview)
);
CREATE INDEX play_listeners_last_at ON play_listeners (last_at);

CREATE TABLE play_hours (
    track_id      uuid        NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    hour          timestamptz NOT NULL CHECK (hour = date_trunc('hour', hour, 'UTC')),
    plays         bigint      NOT NULL DEFAULT 0 CHECK (plays >= 0),
    preview_plays bigint      NOT NULL DEFAULT 0 CHECK (preview_plays >= 0),
    PRIMARY KEY (track_id, hour)
);
CREATE INDEX play_hours_hour ON play_hours (hour);

-- Comments live in the document store; their counts by the hour live here, beside the other
-- engagement, for the charts and the owner's statistics. A comment adds one to the hour it was
-- made in and its deletion takes it back.
CREATE TABLE comment_hours (
    track_id uuid        NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    hour     timestamptz NOT NULL CHECK (hour = date_trunc('hour', hour, 'UTC')),
    comments bigint      NOT NULL DEFAULT 0 CHECK (comments >= 0),
    PRIMARY KEY (track_id, hour)
);
CREATE INDEX comment_hours_hour ON comment_hours (hour);

-- The charts read likes and reposts made within a window.
CREATE INDEX track_likes_created ON track_likes (created_at);
CREATE INDEX track_reposts_created ON track_reposts (created_at);

-- The charts: `trending`, `top_week`, `top_month` and `top_all`, each ranked over every genre
-- (genre '') and within each genre (lower-cased), replaced whole by each computation.
CREATE TABLE chart_entries (
    chart    text             NOT NULL CHECK (chart IN ('trending', 'top_week', 'top_month', 'top_all')),
    genre    text             NOT NULL,
    track_id uuid             NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    score    double precision NOT NULL,
    PRIMARY KEY (chart, genre, track_id)
);
CREATE INDEX chart_entries_rank ON chart_entries (chart, genre, score DESC, track_id);

-- One row per computed tick (the tick is the interval's number since the Unix epoch): a
-- process that takes the lock and finds its tick here has nothing to do.
CREATE TABLE chart_runs (
    tick        bigint      PRIMARY KEY,
    computed_at timestamptz NOT NULL,
    duration_ms bigint      NOT NULL,
    entries     bigint      NOT NULL,
    computed_by text        NOT NULL
);
