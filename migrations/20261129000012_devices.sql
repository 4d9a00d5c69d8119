-- Push devices (shared/src/db/devices.rs): the FCM registration tokens of each account, which
-- the push job (workers/src/jobs/push.rs) sends to.
--
-- A token is one app install; it belongs to one account at a time, so it is the key: an
-- install that signs in to another account moves its row there. An account keeps at most 20
-- (the least recently registered go first), enforced by the repository.

CREATE TABLE devices (
    token      text        PRIMARY KEY CHECK (char_length(token) BETWEEN 1 AND 4096),
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    platform   text        NOT NULL CHECK (platform IN ('android', 'ios', 'web')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When the token was last registered: the order in which an account's devices are kept.
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX devices_user ON devices (user_id, updated_at DESC);
