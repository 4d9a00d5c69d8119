-- The document store's PostgreSQL backend (shared/src/documents/postgres.rs): timestamped
-- comments and the activity feed. The fields that queries filter and sort on are typed
-- columns; the rest of a document is `doc` (jsonb), free to grow fields. No foreign keys:
-- the MongoDB backend cannot have them, and the two must behave alike, so whoever deletes a
-- track or an account deletes its documents through the seam.

CREATE TABLE comment_documents (
    id            uuid        PRIMARY KEY,
    track_id      uuid        NOT NULL,
    user_id       uuid        NOT NULL,
    timestamp_ms  bigint      NOT NULL CHECK (timestamp_ms >= 0),
    -- The root comment; replies are one level deep.
    reply_to      uuid,
    created_at    timestamptz NOT NULL,
    -- {"body": "…"}
    doc           jsonb       NOT NULL
);

-- Along the track (order=timestamp, with a window), and newest first.
CREATE INDEX comment_documents_track_timestamp ON comment_documents (track_id, timestamp_ms, id);
CREATE INDEX comment_documents_track_newest ON comment_documents (track_id, created_at DESC, id DESC);
CREATE INDEX comment_documents_reply_to ON comment_documents (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX comment_documents_user ON comment_documents (user_id);

CREATE TABLE activity_documents (
    id          uuid        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('track', 'track_repost', 'playlist', 'playlist_repost')),
    actor       uuid        NOT NULL,
    object_id   uuid        NOT NULL,
    created_at  timestamptz NOT NULL,
    doc         jsonb       NOT NULL DEFAULT '{}'
);

-- The feed built on read walks this once per followed actor. It covers what a feed page reads
-- (activities are never updated, so the scans stay index-only): with 1,000 followed accounts
-- among 1,000,000 activities, a page took 15-19 ms instead of 24-28 ms with heap fetches.
CREATE INDEX activity_documents_actor ON activity_documents (actor, created_at DESC, id DESC)
    INCLUDE (kind, object_id);
CREATE INDEX activity_documents_object ON activity_documents (object_id);
