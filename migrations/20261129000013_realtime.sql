-- Real time (api/src/realtime.rs): socket tickets, which accounts have a live socket, and who
-- may send an account direct messages.

-- Who may message the account: anyone, or only the accounts it follows.
ALTER TABLE users ADD COLUMN messages_from text NOT NULL DEFAULT 'everyone'
    CHECK (messages_from IN ('everyone', 'following'));

-- Single-use tickets for opening a socket without a cookie (`?ticket=`): only the SHA-256 of
-- the ticket is kept, it works once (the row is deleted as it is used), for 30 seconds, on any
-- replica.
CREATE TABLE ws_tickets (
    hash       bytea       PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_id uuid        NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX ws_tickets_expiry ON ws_tickets (expires_at);

-- Live sockets per API process and account, so any process can tell whether an account is
-- online (then it gets events; otherwise a push). A process refreshes `seen_at` while it
-- runs; rows of a process that stopped refreshing are stale and ignored, then removed.
CREATE TABLE ws_presence (
    replica     uuid        NOT NULL,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    connections integer     NOT NULL CHECK (connections > 0),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, user_id)
);
CREATE INDEX ws_presence_user ON ws_presence (user_id, seen_at);
