-- Email verification and password reset (SECURITY.md, "Accounts and email").

-- When the account proved it receives mail at its address: a verification link was followed,
-- a password reset was completed, or a login provider vouched for the address when it created
-- the account. Only verified addresses link to OAuth identities.
ALTER TABLE users ADD COLUMN email_verified_at timestamptz;

-- Accounts created by an OAuth login were made from an address the provider had verified.
UPDATE users SET email_verified_at = created_at
WHERE role <> 'system' AND id IN (SELECT user_id FROM oauth_identities);

-- Single-use tokens sent by mail: 256 random bits, of which only the SHA-256 is stored. Using a
-- token deletes its row. `email` is the address the mail went to: a token works only while the
-- account still has that address.
CREATE TABLE account_tokens (
    token_hash bytea PRIMARY KEY,
    purpose    text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX account_tokens_user ON account_tokens (user_id, purpose, created_at);
-- Issuing a token forgets every expired one.
CREATE INDEX account_tokens_expiry ON account_tokens (expires_at);

-- Sessions now also end with `password_reset` (a completed reset ends every session of the
-- account) and `max_age` (the family outlived `refresh_family_max_age_s`).
COMMENT ON COLUMN sessions.ended_why IS 'logout, refresh_reused, suspended, password_reset, max_age';
