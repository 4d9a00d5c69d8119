-- The API: revoked session tokens, direct uploads, and the indexes that listing needs.

-- Access tokens are stateless JWTs; logging out records the token's id here until it expires,
-- and every authenticated request checks it.
CREATE TABLE revoked_tokens (
    jti        uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);

-- A track created by `POST /v1/uploads` waits in `awaiting_upload` until the client says the
-- object is there (`POST /v1/uploads/{id}/complete`), at the latest at this time.
ALTER TABLE tracks ADD COLUMN upload_expires_at timestamptz;

-- `GET /v1/tracks` without an owner: the public catalogue, newest first.
CREATE INDEX tracks_public_created ON tracks (created_at DESC, id DESC) WHERE visibility = 'public';
