-- Billing (Stripe subscriptions, the account's tier) and premium-only tracks. Forward-only.

-- What an account may do beyond the free tier. Kept on the account (rather than computed from
-- its subscriptions on every request) so that every check reads one column; it is written in
-- the same transaction as the subscription change that decides it (shared/src/db/billing.rs).
ALTER TABLE users ADD COLUMN tier text NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'premium'));

-- A tier change alters what a request may do: cached sessions of the account are dropped on
-- every API process (see api/src/session_cache.rs), as for a change of role.
CREATE FUNCTION waveline_tier_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('waveline_session', json_build_object('user', NEW.id)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER users_tier_notify AFTER UPDATE OF tier ON users
    FOR EACH ROW WHEN (OLD.tier IS DISTINCT FROM NEW.tier) EXECUTE FUNCTION waveline_tier_notify();

-- The Stripe customer of an account: created at its first checkout, reused afterwards.
CREATE TABLE billing_customers (
    user_id     uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    customer_id text NOT NULL UNIQUE CHECK (char_length(customer_id) BETWEEN 1 AND 255),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Stripe subscriptions as last read from Stripe's API. The tier follows from them: premium
-- while one is `active` or `trialing`.
CREATE TABLE subscriptions (
    id                   text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 255),
    user_id              uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    customer_id          text NOT NULL,
    status               text NOT NULL,
    price_id             text,
    current_period_end   timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    -- Stripe's `created` of the subscription: the newest one is the account's.
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_user ON subscriptions (user_id, created_at DESC);

-- Webhook events already applied: an event id is inserted in the transaction that applies
-- the event, so a redelivered event changes nothing.
CREATE TABLE billing_events (
    id           text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 255),
    type         text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- A track only premium listeners (and its owner, and admins) play in full; others get the
-- 30 s preview.
ALTER TABLE tracks ADD COLUMN premium_only boolean NOT NULL DEFAULT false;
