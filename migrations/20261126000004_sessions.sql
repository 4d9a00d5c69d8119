-- Sessions with rotating refresh tokens, per-account login throttling, suspension, secret
-- share links, OAuth logins, and status notifications.

-- One session per login: the family of its refresh tokens. Access tokens carry the session's id
-- (`sid`), and every authenticated request checks the session is live, so ending a session
-- (logout, a reused refresh token, a suspension) ends its access tokens at once. This replaces
-- the per-token revocation list.
CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    refreshed_at timestamptz NOT NULL DEFAULT now(),
    ended_at     timestamptz,
    -- `logout`, `refresh_reused`, `suspended`.
    ended_why    text
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Refresh tokens are 256 random bits; only their SHA-256 is stored. A token is used once: its
-- use records `used_at` and issues the next one in the same session. A second use of a used
-- token means it was stolen (or the client is broken): the whole session ends.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

DROP TABLE revoked_tokens;

-- Failed logins by email (lower-cased), whether or not an account has it, so the throttling
-- does not tell which emails are registered.
CREATE TABLE login_failures (
    email          text PRIMARY KEY,
    failures       integer NOT NULL,
    last_failed_at timestamptz NOT NULL,
    blocked_until  timestamptz,
    locked         boolean NOT NULL DEFAULT false
);

-- A suspended account cannot log in, and its sessions end.
ALTER TABLE users ADD COLUMN suspended_at timestamptz;

-- A private track's secret share link: the SHA-256 of its token (the token itself is shown to
-- the owner once). Replacing it, or clearing it, revokes the old link.
ALTER TABLE tracks ADD COLUMN share_hash bytea;

-- OAuth 2.0 / OpenID Connect logins in flight: the SHA-256 of the `state`, with the PKCE
-- verifier it goes with. A callback consumes its row, so a state (and its code) works once.
CREATE TABLE oauth_states (
    state_hash  bytea PRIMARY KEY,
    provider    text NOT NULL,
    verifier    text NOT NULL,
    redirect_to text NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Accounts at providers, linked to ours.
CREATE TABLE oauth_identities (
    provider   text NOT NULL,
    subject    text NOT NULL,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subject)
);
CREATE INDEX oauth_identities_user ON oauth_identities (user_id);

-- Every change of a track's status is announced on `waveline_track_status` with the new status,
-- so `GET /v1/tracks/{id}/events` sends one event per change, as it commits, instead of
-- sampling the row. A deletion is announced too, so streams of deleted tracks end.
CREATE FUNCTION waveline_track_status_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('waveline_track_status', json_build_object('id', OLD.id, 'deleted', true)::text);
    ELSIF TG_OP = 'INSERT'
          OR NEW.state IS DISTINCT FROM OLD.state
          OR NEW.stage IS DISTINCT FROM OLD.stage
          OR NEW.progress IS DISTINCT FROM OLD.progress
          OR NEW.revision IS DISTINCT FROM OLD.revision
          OR NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        PERFORM pg_notify('waveline_track_status', json_build_object(
            'id', NEW.id, 'state', NEW.state, 'stage', NEW.stage, 'progress', NEW.progress,
            'attempts', NEW.attempts, 'revision', NEW.revision, 'error_code', NEW.error_code,
            'error_message', left(NEW.error_message, 2000))::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tracks_status_notify AFTER INSERT OR UPDATE OR DELETE ON tracks
    FOR EACH ROW EXECUTE FUNCTION waveline_track_status_notify();
