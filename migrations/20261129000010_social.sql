-- The social layer's relational data (shared/src/db/social.rs): profiles, follows, blocks,
-- likes, reposts and playlists. Comments and activities are documents (migration 9, or
-- MongoDB).
--
-- Counts are not stored: each is counted from these rows when asked (index-only scans on the
-- indexes below), so no counter can drift from the rows it counts, whatever runs at once.

ALTER TABLE users
    ADD COLUMN display_name text NOT NULL DEFAULT '' CHECK (char_length(display_name) <= 100),
    ADD COLUMN bio          text NOT NULL DEFAULT '' CHECK (char_length(bio) <= 4000);

-- When the track's `track` activity was written (it first became ready while public, or public
-- while ready): at most one per track, claimed here before it is written to the documents.
ALTER TABLE tracks ADD COLUMN announced_at timestamptz;

CREATE TABLE follows (
    follower_id uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    followee_id uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (follower_id, followee_id),
    CONSTRAINT no_self_follow CHECK (follower_id <> followee_id)
);
-- An account's followers, newest first; its followings are the primary key's prefix, and
-- newest first through this one.
CREATE INDEX follows_followee ON follows (followee_id, created_at DESC, follower_id DESC);
CREATE INDEX follows_follower ON follows (follower_id, created_at DESC, followee_id DESC);

CREATE TABLE blocks (
    blocker_id uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    blocked_id uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (blocker_id, blocked_id),
    CONSTRAINT no_self_block CHECK (blocker_id <> blocked_id)
);
CREATE INDEX blocks_blocker ON blocks (blocker_id, created_at DESC, blocked_id DESC);
CREATE INDEX blocks_blocked ON blocks (blocked_id);

CREATE TABLE playlists (
    id           uuid        PRIMARY KEY,
    owner_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title        text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description  text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 5000),
    visibility   text        NOT NULL DEFAULT 'public' CHECK (visibility IN ('public', 'private')),
    -- When its `playlist` activity was written (as for tracks).
    announced_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX playlists_owner ON playlists (owner_id, created_at DESC, id DESC);

-- A playlist's tracks in order. A deleted track drops out (the cascade); the positions left
-- keep their order.
CREATE TABLE playlist_tracks (
    playlist_id uuid    NOT NULL REFERENCES playlists (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position >= 0),
    track_id    uuid    NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    PRIMARY KEY (playlist_id, position),
    UNIQUE (playlist_id, track_id)
);
CREATE INDEX playlist_tracks_track ON playlist_tracks (track_id);

-- Likes and reposts of tracks and playlists: one row per account and object.
CREATE TABLE track_likes (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    track_id   uuid        NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, track_id)
);
CREATE INDEX track_likes_track ON track_likes (track_id, user_id);
CREATE INDEX track_likes_user ON track_likes (user_id, created_at DESC, track_id DESC);

CREATE TABLE track_reposts (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    track_id   uuid        NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, track_id)
);
CREATE INDEX track_reposts_track ON track_reposts (track_id, user_id);
CREATE INDEX track_reposts_user ON track_reposts (user_id, created_at DESC, track_id DESC);

CREATE TABLE playlist_likes (
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playlist_id uuid        NOT NULL REFERENCES playlists (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, playlist_id)
);
CREATE INDEX playlist_likes_playlist ON playlist_likes (playlist_id, user_id);
CREATE INDEX playlist_likes_user ON playlist_likes (user_id, created_at DESC, playlist_id DESC);

CREATE TABLE playlist_reposts (
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    playlist_id uuid        NOT NULL REFERENCES playlists (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, playlist_id)
);
CREATE INDEX playlist_reposts_playlist ON playlist_reposts (playlist_id, user_id);
CREATE INDEX playlist_reposts_user ON playlist_reposts (user_id, created_at DESC, playlist_id DESC);
