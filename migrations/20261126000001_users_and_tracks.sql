-- Users and tracks: the first schema. Forward-only; later issues add their own migrations.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    username      text NOT NULL CHECK (username ~ '^[a-z0-9_-]{3,30}$'),
    -- argon2id PHC string; NULL for accounts that cannot log in with a password
    -- (the system account, OAuth-only users).
    password_hash text,
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin', 'system')),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
CREATE UNIQUE INDEX users_username_key ON users (username);

-- The owner of tracks imported by operators (`waveline import` without --owner).
INSERT INTO users (id, email, username, role)
VALUES ('00000000-0000-7000-8000-000000000001', 'system@waveline.invalid', 'system', 'system');

CREATE TABLE tracks (
    id               uuid PRIMARY KEY,
    owner_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title            text NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description      text NOT NULL DEFAULT '' CHECK (char_length(description) <= 5000),
    genre            text CHECK (char_length(genre) <= 100),
    tags             text[] NOT NULL DEFAULT '{}',
    visibility       text NOT NULL DEFAULT 'public' CHECK (visibility IN ('public', 'private')),

    -- Processing state (DESIGN.md): every change is a compare-and-set on `state`.
    state            text NOT NULL CHECK (state IN
                        ('awaiting_upload', 'uploaded', 'queued', 'processing', 'ready', 'failed')),
    stage            text CHECK (stage IN ('probing', 'decoding', 'analyzing', 'encoding', 'storing')),
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error_code       text,
    error_message    text,
    -- Claims of the current revision by a worker.
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Bumped each time the track is (re)queued after finishing; renditions are keyed by it.
    revision         integer NOT NULL DEFAULT 1 CHECK (revision >= 1),
    heartbeat_at     timestamptz,

    original_key     text,
    original_size    bigint CHECK (original_size >= 0),
    duration_ms      bigint CHECK (duration_ms >= 0),

    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    state_changed_at timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT stage_only_while_processing CHECK ((state = 'processing') = (stage IS NOT NULL)),
    CONSTRAINT failure_has_a_reason CHECK ((state = 'failed') = (error_code IS NOT NULL AND error_message IS NOT NULL))
);
CREATE INDEX tracks_owner_created ON tracks (owner_id, created_at DESC, id DESC);
-- The reconciler and `reprocess --state` look for unfinished work.
CREATE INDEX tracks_unfinished ON tracks (state, state_changed_at) WHERE state NOT IN ('ready');
