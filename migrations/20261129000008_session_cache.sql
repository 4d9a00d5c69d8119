-- Session liveness is cached in each API process (see api/src/session_cache.rs): these
-- triggers announce, on `waveline_session`, every change that can end a session or alter what
-- an authenticated request learns about its account, so every process drops what it cached
-- within the time a notification takes. A trigger rather than a notification from each code
-- path, so no path that ends a session (logout, a reused refresh token, a suspension, a
-- password reset, the family's lifetime, an operator's SQL) can forget it.

-- A session ended, was deleted (the idle clean-up, the account's deletion), or moved.
CREATE FUNCTION waveline_session_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('waveline_session', json_build_object('session', OLD.id)::text);
    ELSIF NEW.ended_at IS DISTINCT FROM OLD.ended_at OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        PERFORM pg_notify('waveline_session', json_build_object('session', OLD.id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_notify AFTER UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION waveline_session_notify();

-- An account changed in what a request sees of it (role, suspension, identity, password,
-- verification), or was deleted: every cached session of it is dropped.
CREATE FUNCTION waveline_session_user_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('waveline_session', json_build_object('user', OLD.id)::text);
    ELSIF NEW.role IS DISTINCT FROM OLD.role
          OR NEW.suspended_at IS DISTINCT FROM OLD.suspended_at
          OR NEW.email IS DISTINCT FROM OLD.email
          OR NEW.username IS DISTINCT FROM OLD.username
          OR NEW.password_hash IS DISTINCT FROM OLD.password_hash
          OR NEW.email_verified_at IS DISTINCT FROM OLD.email_verified_at
          OR NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM pg_notify('waveline_session', json_build_object('user', OLD.id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_session_notify AFTER UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION waveline_session_user_notify();
