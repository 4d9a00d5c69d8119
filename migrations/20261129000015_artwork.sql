-- Artwork and avatars: one image per track, playlist or account.
--
-- `version` names the latest upload (random, 32 hex digits; its objects lie under
-- `images/{subject}s/{id}/{version}/`); `ready_version` the one served, which stays until a
-- newer one is ready. `state` is the latest upload's: `pending` (stored, job queued),
-- `processing`, `ready` or `failed` (with a code). `source` says where the original came
-- from: an upload, or the artwork embedded in a track's audio file (only ever used while the
-- owner has uploaded none).
CREATE TABLE images (
    subject        text NOT NULL CHECK (subject IN ('track', 'playlist', 'user')),
    subject_id     uuid NOT NULL,
    state          text NOT NULL CHECK (state IN ('pending', 'processing', 'ready', 'failed')),
    source         text NOT NULL CHECK (source IN ('upload', 'embedded')),
    version        text NOT NULL CHECK (version ~ '^[0-9a-f]{32}$'),
    original_key   text NOT NULL,
    ready_version  text CHECK (ready_version ~ '^[0-9a-f]{32}$'),
    attempts       integer NOT NULL DEFAULT 0,
    error_code     text,
    error_message  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, subject_id)
);

-- An image goes with what it belongs to (its objects are deleted by the code that deletes
-- the subject's objects).
CREATE FUNCTION images_forget_subject() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM images WHERE subject = TG_ARGV[0] AND subject_id = OLD.id;
    RETURN OLD;
END;
$$;

CREATE TRIGGER tracks_images_forget AFTER DELETE ON tracks
    FOR EACH ROW EXECUTE FUNCTION images_forget_subject('track');
CREATE TRIGGER playlists_images_forget AFTER DELETE ON playlists
    FOR EACH ROW EXECUTE FUNCTION images_forget_subject('playlist');
CREATE TRIGGER users_images_forget AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION images_forget_subject('user');
